"""The one name rule for everything that becomes a file name or a path.

Names arrive from peers (the run key, stage and component names of a coordinator's request,
digests, a site's name in its manifest) and from files. Each is checked here against a single
rule *before* it is joined to a folder, and :func:`path_under` checks that the resolved path
stays inside that folder, so neither ``../../x`` nor an absolute path nor a symlink can lead a
write elsewhere.

The rule (:data:`NAME_PATTERN`): 1–64 characters, lower-case ASCII letters and digits, ``-``
and ``_``, starting with a letter or digit. It is matched in full (no trailing newline), so
bidi controls, zero-width characters, dots, slashes and spaces never pass.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from unicon_model.errors import UniconModelError

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
"""Modality, task, stage, site and run names: lower case, digits, ``-`` and ``_``."""

NAME_RULE = "1-64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
"""The name rule in words, for error messages."""

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_COMPONENT_KINDS = ("modality", "task")


class UnsafeNameError(UniconModelError, ValueError):
    """A name from a message or a file breaks the name rule or would leave its folder."""


def is_valid_name(name: object) -> bool:
    """Whether ``name`` is a string that follows :data:`NAME_PATTERN` in full."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_name(name: object, what: str) -> str:
    """Return ``name`` if it follows the name rule.

    Parameters
    ----------
    name
        The value to check (anything: it may come straight from a message).
    what
        What the value is, for the error (``"run"``, ``"stage"``, ``"site name"``).

    Raises
    ------
    UnsafeNameError
        Naming ``what``, the offending value (``repr``, so control characters show) and the rule.
    """
    if not is_valid_name(name):
        raise UnsafeNameError(f"{what} {name!r} is not a valid name: use {NAME_RULE}")
    return str(name)


def check_digest(digest: object, what: str = "digest") -> str:
    """Return ``digest`` if it is 64 lower-case hex characters (a sha256).

    Raises
    ------
    UnsafeNameError
        Naming ``what`` and the offending value.
    """
    if not isinstance(digest, str) or _DIGEST_RE.fullmatch(digest) is None:
        raise UnsafeNameError(f"{what} {digest!r} is not a sha256 hex digest (64 of 0-9a-f)")
    return digest


def check_component_name(component: object) -> str:
    """Return a component name if it is ``backbone`` or ``modality|task/<name>``.

    Raises
    ------
    UnsafeNameError
        Naming the component and the accepted forms.
    """
    if isinstance(component, str):
        if component == "backbone":
            return component
        kind, sep, name = component.partition("/")
        if sep and kind in _COMPONENT_KINDS and is_valid_name(name):
            return component
    raise UnsafeNameError(
        f"component {component!r} is not a valid component name: use 'backbone', "
        f"'modality/<name>' or 'task/<name>' with <name> of {NAME_RULE}"
    )


def path_under(root: str | os.PathLike[str], *parts: str) -> Path:
    """Join ``parts`` (each one checked name) to ``root`` and prove the result stays inside.

    Each part must be a single path segment: no separator, not ``.``/``..``, not absolute, no
    NUL. The joined path is resolved (symlinks followed) and must lie under the resolved
    ``root``.

    Parameters
    ----------
    root
        The folder the result must stay in.
    *parts
        Path segments, normally names already checked with :func:`check_name` and friends.

    Raises
    ------
    UnsafeNameError
        Naming the offending part or the path that would leave ``root``.
    """
    base = Path(root).resolve()
    for part in parts:
        if (
            not isinstance(part, str)
            or not part
            or part in (".", "..")
            or "/" in part
            or "\\" in part
            or "\x00" in part
            or os.path.isabs(part)
        ):
            raise UnsafeNameError(f"path part {part!r} under {base} is not a single safe file name")
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise UnsafeNameError(f"path {path} would leave its folder {base}; refusing it")
    return path
