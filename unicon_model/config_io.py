"""Reading configuration documents and wording their problems, written once.

Plans (:func:`unicon_model.schema.load_plan`), site policies (``client.policy.load_policy``)
and site manifests (``client.manifest``) are TOML, YAML or JSON files told apart by their
suffix. :func:`document_format` maps a suffix to its format and :func:`parse_document` parses
text with that format's safe parser (``tomllib``, a ``yaml.SafeLoader`` that builds no Python
objects, ``json``); :func:`load_document` reads a whole file into a mapping, or raises the
caller's :class:`~unicon_model.errors.ProblemsError` naming the file. :func:`pydantic_problems`
words a pydantic ``ValidationError`` as one ``field.path: message`` line per error.
"""

from __future__ import annotations

import json
import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from unicon_model.errors import ProblemsError

logger = logging.getLogger(__name__)

DOCUMENT_FORMATS: Mapping[str, str] = MappingProxyType(
    {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
)
"""The format (``TOML``, ``YAML`` or ``JSON``) of each known suffix (lower case)."""

DOCUMENT_SUFFIXES: tuple[str, ...] = tuple(DOCUMENT_FORMATS)
"""Every suffix :func:`load_document` reads by default."""

Translate = Callable[[ErrorDetails], str | None]
"""A caller's own message for one pydantic error, or ``None`` for the default one."""


def suffix_list(allowed: Sequence[str]) -> str:
    """The suffixes as a message lists them: ``.toml, .yaml, .yml or .json``.

    Parameters
    ----------
    allowed
        The suffixes, in the order shown.
    """
    if len(allowed) < 2:
        return "".join(allowed)
    return f"{', '.join(allowed[:-1])} or {allowed[-1]}"


def document_format(path: Path, allowed: Sequence[str] = DOCUMENT_SUFFIXES) -> str | None:
    """The format of ``path`` by its suffix (any case), if the suffix is allowed.

    Parameters
    ----------
    path
        The file.
    allowed
        The suffixes accepted (keys of :data:`DOCUMENT_FORMATS`).

    Returns
    -------
    str or None
        ``"TOML"``, ``"YAML"`` or ``"JSON"``; ``None`` for a suffix not allowed.
    """
    suffix = path.suffix.lower()
    return DOCUMENT_FORMATS.get(suffix) if suffix in allowed else None


def parse_document(
    text: str, kind: str, *, yaml_loader: type[yaml.SafeLoader] = yaml.SafeLoader
) -> Any:
    """Parse ``text`` with the safe parser of its format.

    Parameters
    ----------
    text
        The document.
    kind
        ``"TOML"``, ``"YAML"`` or ``"JSON"`` (see :func:`document_format`).
    yaml_loader
        The YAML loader: ``yaml.SafeLoader`` or a stricter subclass (YAML tags that build
        Python objects, such as ``!!python/object``, are refused either way).

    Returns
    -------
    Any
        The parsed value (``None`` for an empty YAML document or JSON ``null``).

    Raises
    ------
    ValueError
        TOML or JSON syntax errors (``tomllib.TOMLDecodeError``, ``json.JSONDecodeError``),
        or an unknown format.
    yaml.YAMLError
        YAML syntax errors and refused YAML constructs.
    """
    if kind == "TOML":
        return tomllib.loads(text)
    if kind == "YAML":
        return yaml.load(text, Loader=yaml_loader)  # a SafeLoader: plain data only
    if kind == "JSON":
        return json.loads(text)
    raise ValueError(f"unknown document format {kind!r}; use TOML, YAML or JSON")


@dataclass(frozen=True)
class DocumentWording:
    """How :func:`load_document` words each problem (``str.format`` templates).

    Every template may use ``{what}`` (the document's name), ``{path}``, ``{suffix}`` (as
    given), ``{format}`` (``TOML``, ``YAML`` or ``JSON``) and ``{extension}`` (the suffix
    without its dot, or the format for a file without one).

    Attributes
    ----------
    unknown_suffix
        A suffix that is not allowed; also ``{allowed}`` (e.g. ``.toml, .yaml, .yml or .json``).
    unreadable
        The file cannot be read; also ``{reason}``.
    invalid
        A syntax error; also ``{error}``.
    not_mapping
        The top level is not a mapping; also ``{type}`` (its Python type name).
    empty
        An empty document (YAML without content, JSON ``null``); ``None`` reads it as an
        empty mapping.
    """

    unknown_suffix: str = "unknown format {suffix!r}; use {allowed}"
    unreadable: str = "cannot read the file: {reason}"
    invalid: str = "not valid {format}: {error}"
    not_mapping: str = "the {what} must be a table/mapping at the top level, got {type}"
    empty: str | None = None


ProblemsErrorType = Callable[[list[str], str], ProblemsError]
"""Builds the caller's error from its problems and the file (e.g. ``PlanError``)."""


def _problem_builder(
    path: Path, found: str | None, what: str, error: ProblemsErrorType
) -> Callable[..., ProblemsError]:
    """A function building ``error`` from a wording template and its fields, for ``path``."""

    def problem(template: str, **fields: Any) -> ProblemsError:
        extension = path.suffix.lstrip(".") or found
        message = template.format(
            what=what, path=path, suffix=path.suffix, format=found, extension=extension, **fields
        )
        return error([message], str(path))

    return problem


def _read_and_parse(
    path: Path,
    found: str,
    wording: DocumentWording,
    problem: Callable[..., ProblemsError],
) -> Any:
    """Read ``path`` as UTF-8 text and parse it as ``found``; unreadable or invalid raise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise problem(wording.unreadable, reason=e.strerror or e) from e
    try:
        return parse_document(text, found)
    except (ValueError, yaml.YAMLError) as e:
        raise problem(wording.invalid, error=e) from e


def load_document(
    path: str | Path,
    *,
    allowed: Sequence[str] = DOCUMENT_SUFFIXES,
    what: str = "document",
    error: ProblemsErrorType = ProblemsError,
    wording: DocumentWording = DocumentWording(),
    fallback: str | None = None,
) -> dict[str, Any]:
    """Read a TOML, YAML or JSON file, chosen by its suffix, into a mapping.

    Parameters
    ----------
    path
        The file (UTF-8 text).
    allowed
        The suffixes read (keys of :data:`DOCUMENT_FORMATS`, matched in any case).
    what
        The document's name in messages (``plan``, ``policy``).
    error
        The error raised, built from the problem and ``str(path)``; it names the file.
    wording
        The caller's wording of each problem.
    fallback
        The format of a file whose suffix is not allowed; ``None`` refuses such a file.

    Returns
    -------
    dict[str, Any]
        The document's top-level mapping.

    Raises
    ------
    ProblemsError
        Built by ``error`` when the suffix is not allowed (naming the allowed ones), the file
        cannot be read, its syntax is invalid or its top level is not a mapping.
    UnicodeDecodeError
        The file is not UTF-8 text.
    """
    path = Path(path)
    found = document_format(path, allowed) or fallback
    problem = _problem_builder(path, found, what, error)
    if found is None:
        raise problem(wording.unknown_suffix, allowed=suffix_list(allowed))
    data = _read_and_parse(path, found, wording, problem)
    if data is None:
        if wording.empty is not None:
            raise problem(wording.empty)
        data = {}
    if not isinstance(data, dict):
        raise problem(wording.not_mapping, type=type(data).__name__)
    logger.debug("read %s %s (%s)", what, path, found)
    return data


def field_path(prefix: str, loc: Iterable[int | str], *, brackets: bool = True) -> str:
    """The dotted path of a pydantic error location, after ``prefix``.

    Parameters
    ----------
    prefix
        The path of the validated value itself (e.g. ``stages[1]``); empty at the top.
    loc
        The error's ``loc``.
    brackets
        Write list indices as ``[1]`` (else as ``.1``).

    Returns
    -------
    str
        E.g. ``stages[1].optimiser.lr``; empty for an error of the value itself.
    """
    path = prefix
    for part in loc:
        if brackets and isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def pydantic_fields(
    error: ValidationError,
    *,
    prefix: str = "",
    brackets: bool = True,
    unknown: str = "check the spelling",
    translate: Translate | None = None,
) -> list[tuple[str, str]]:
    """Each error of ``error`` as its field path and a readable message.

    Parameters
    ----------
    error
        The validation error.
    prefix, brackets
        As for :func:`field_path`.
    unknown
        What follows ``unknown field (`` for a field the model does not have, e.g.
        ``check the spelling; known fields: a, b``.
    translate
        The caller's own message for an error, if any (it comes first).

    Returns
    -------
    list[tuple[str, str]]
        ``(field, message)`` per error; the message drops pydantic's ``Value error,``.
    """
    fields = []
    for item in error.errors():
        message = translate(item) if translate is not None else None
        if message is None and item["type"] == "extra_forbidden":
            message = f"unknown field ({unknown})"
        if message is None:
            message = str(item["msg"]).removeprefix("Value error, ")
        fields.append((field_path(prefix, item["loc"], brackets=brackets), message))
    return fields


def pydantic_problems(
    error: ValidationError,
    *,
    prefix: str = "",
    root: str = "<document>",
    brackets: bool = True,
    unknown: str = "check the spelling",
    translate: Translate | None = None,
) -> list[str]:
    """Each error of ``error`` as one ``field.path: message`` line.

    Parameters
    ----------
    error, prefix, brackets, unknown, translate
        As for :func:`pydantic_fields`.
    root
        The field shown for an error of the whole value (e.g. ``<plan>``).

    Returns
    -------
    list[str]
        E.g. ``stages[1].optimiser.lr: Input should be greater than 0``.
    """
    fields = pydantic_fields(
        error, prefix=prefix, brackets=brackets, unknown=unknown, translate=translate
    )
    return [f"{field or root}: {message}" for field, message in fields]
