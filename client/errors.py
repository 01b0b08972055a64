"""Errors raised by the hospital-site package :mod:`client`.

Each message names the file, case, field or request at fault and the fix. The ClientApp
turns a :class:`SiteError` into an error reply with that message, never a crash of the
daemon.
"""

from __future__ import annotations

from unicon_model.errors import ProblemsError


class SiteError(Exception):
    """Base class of every error raised on purpose by the site package."""


class ManifestError(SiteError, ProblemsError):
    """A site manifest cannot be read or is invalid.

    Parameters
    ----------
    problems
        Every problem found, each naming the case and field.
    source
        The manifest file.
    """


class PolicyError(SiteError, ProblemsError):
    """The site's policy file is missing or invalid (``N problem(s) in site policy <file>``).

    Parameters
    ----------
    problems
        Every problem found, each naming the policy field.
    source
        The policy file.
    """

    source_label = "site policy"


class RequestRefused(SiteError):
    """The site refuses a request: its policy forbids it (task, modality, privacy budget)."""


class PrivacyBudgetExceeded(RequestRefused):
    """Serving the request would exceed the site's differential-privacy budget."""


class AuditError(SiteError):
    """The audit log cannot be written or its hash chain is broken."""


class DataError(SiteError):
    """A case cannot be loaded or transformed (the trainer skips it with a logged reason)."""


class TrainingError(SiteError):
    """Local training failed (e.g. produced NaN/Inf weights, which are never sent)."""
