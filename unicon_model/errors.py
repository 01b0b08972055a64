"""Errors raised by :mod:`unicon_model`.

One shallow hierarchy: every error the package raises on purpose is a
:class:`UniconModelError`, so callers (CLI, ClientApp, ServerApp) can catch one type and
report its message, which always names the file, field or component at fault and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class UniconModelError(Exception):
    """Base class of every error raised on purpose by ``unicon_model``."""


class ProblemsError(Exception):
    """Every problem found in one input, reported together: ``N problem(s) in <source>:``.

    The shared base of the errors that list problems (:class:`PlanError`, and the site's
    ``client.errors.ManifestError`` and ``client.errors.PolicyError``); each problem is one
    line of the message.

    Parameters
    ----------
    problems
        Every problem found, each naming the field at fault and the fix.
    source
        The file (or other input) the problems are in, if any.

    Attributes
    ----------
    source_label
        Words put before ``source`` in the message (e.g. ``"site policy"``); empty for none.
    """

    source_label: ClassVar[str] = ""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        label = f"{self.source_label} " if self.source_label else ""
        where = f" in {label}{source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from the problems, not the message (pickling passes ``args`` back to __init__)
        return type(self), (self.problems, self.source)


class PlanError(UniconModelError, ProblemsError):
    """A plan or stage specification is invalid.

    Parameters
    ----------
    problems
        Every problem found, each naming the field (e.g. ``stages[1].rounds``) and the fix.
    source
        The file the plan came from, if any.
    """


class GrowthError(UniconModelError):
    """The model cannot be grown as asked (duplicate or unknown component, bad init source)."""


class ComponentError(UniconModelError):
    """A set of tensors does not match the model's components (unknown keys, wrong shapes)."""


class CheckpointError(UniconModelError):
    """A checkpoint is missing, truncated, tampered with or in an unknown format."""


class AnalyticHeadError(UniconModelError):
    """Sufficient statistics for an analytic head are inconsistent or cannot be solved."""
