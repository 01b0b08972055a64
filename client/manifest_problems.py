"""Problems of a site manifest: where they are, and readable messages with the fix.

A :class:`ManifestProblem` names the case and field at fault; :func:`validation_problems`
turns a pydantic error into such problems with messages that say how to fix them, and
:func:`duplicate_id` is the one check of case ids that both the raw-data checks
(:mod:`client.manifest_raw`) and :class:`client.manifest_models.SiteManifest` run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from unicon_model.config_io import pydantic_fields

IMAGE_EXAMPLE = "images: {ct: ct/case-001.nii.gz}"
"""How a case lists its images, quoted in messages."""


@dataclass(frozen=True)
class ManifestProblem:
    """One problem of a manifest, located by case and field.

    Attributes
    ----------
    field
        Dotted field path (``labels.lesion-class``, ``tasks.survival.kind``); empty when the
        problem concerns the whole file.
    message
        What is wrong and how to fix it.
    case
        The case id, when the problem is within a case that has one.
    index
        Position of the case in ``cases``, when within a case.
    """

    field: str
    message: str
    case: str | None = None
    index: int | None = None

    @property
    def where(self) -> str | None:
        """``case 'id' (cases[i])``, ``cases[i]`` or ``None`` outside the cases."""
        if self.index is None:
            return f"case {self.case!r}" if self.case is not None else None
        if self.case is None:
            return f"cases[{self.index}]"
        return f"case {self.case!r} (cases[{self.index}])"

    def __str__(self) -> str:
        where = self.where
        if where is None:
            return f"{self.field}: {self.message}" if self.field else self.message
        return f"{where}.{self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (ending in ``...`` when cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _translate(error: ErrorDetails) -> str | None:
    """A readable message with the fix for a pydantic error (``None``: pydantic's own)."""
    loc = [str(part) for part in error["loc"]]
    kind = error["type"]
    value = error.get("input")
    message: str | None = None
    if kind == "missing":
        hints = {
            "images": f"list the case's image files, e.g. {IMAGE_EXAMPLE}",
            "id": "give the case a unique id, e.g. id: case-001",
            "kind": "set kind: classification, survival or segmentation",
            "time": "give the follow-up time, e.g. {time: 523.0, event: 1}",
            "event": "give the event indicator 0 (censored) or 1, e.g. {time: 523.0, event: 1}",
        }
        message = "is required" + (f"; {hints[loc[-1]]}" if loc and loc[-1] in hints else "")
    elif kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        what = "split" if loc and loc[-1] == "split" else "value"
        message = f"unknown {what} {short(value)}; use {expected}"
    elif kind == "string_type":
        message = f"must be a string, got {short(value)} (quote it in YAML)"
    elif kind in {"dict_type", "model_type", "model_attributes_type"}:
        message = f"must be a mapping, got {short(value)}"
    elif kind == "list_type":
        message = f"must be a list, got {short(value)}"
    elif kind in {"float_parsing", "float_type", "finite_number"}:
        message = f"must be a number, got {short(value)}"
    elif kind in {"int_parsing", "int_type", "int_from_float"}:
        message = f"must be an integer, got {short(value)}"
    return message


def validation_problems(
    error: ValidationError,
    model: type[BaseModel],
    *,
    prefix: str = "",
    case: str | None = None,
    index: int | None = None,
) -> list[ManifestProblem]:
    """The problems of a pydantic validation error of ``model``, located by case and field.

    Parameters
    ----------
    error
        The error raised validating ``model``.
    model
        The model validated; its field names are listed for unknown fields.
    prefix
        Dotted field path of the validated value (e.g. ``tasks.survival``).
    case, index
        The case id and position, when the value is (part of) a case.

    Returns
    -------
    list[ManifestProblem]
        One problem per error, with the readable message of :func:`_translate` when it
        has one.
    """
    known = ", ".join(name for name in model.model_fields if name != "root")
    fields = pydantic_fields(
        error,
        prefix=prefix,
        brackets=False,
        unknown=f"check the spelling; known fields: {known}",
        translate=_translate,
    )
    return [ManifestProblem(field, message, case, index) for field, message in fields]


def duplicate_id(first: dict[str, int], case_id: str, index: int) -> ManifestProblem | None:
    """The problem of a case id already used by an earlier case; records a first use.

    Parameters
    ----------
    first
        Case id -> position of the first case with that id, filled in by this function as
        the cases are walked in order.
    case_id
        The id of the case at ``index``.
    index
        Position of the case in ``cases``.

    Returns
    -------
    ManifestProblem | None
        The duplicate-id problem (naming the first case with that id), or ``None`` when
        ``case_id`` is used for the first time.
    """
    if case_id in first:
        message = f"duplicate case id (cases[{first[case_id]}] has the same id); make ids unique"
        return ManifestProblem("id", message, case_id, index)
    first[case_id] = index
    return None
