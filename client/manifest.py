"""The site manifest: a hospital's cases, their image files, labels and splits.

The manifest is a YAML or JSON file written by the hospital; every path in it is relative
to the manifest's folder (absolute paths are kept). Example ``manifest.yaml``::

    site: hospital-a
    tasks:
      lesion-class: {kind: classification, classes: [benign, malignant]}
      survival:     {kind: survival}                  # label: {time: >0, event: 0|1}
      lesion-seg:   {kind: segmentation, labels: [background, tumour]}
    cases:
      - id: case-001
        split: train                                  # train | val | test
        images: {ct: ct/case-001.nii.gz, pet: pet/case-001.nii.gz}
        clinical: {age: 64, stage: 2}                 # optional numeric covariates
        labels: {lesion-class: malignant, survival: {time: 523.0, event: 1},
                 lesion-seg: seg/case-001.nii.gz}

A MONAI / Medical Segmentation Decathlon datalist (``dataset.json`` with ``training``,
``validation`` and ``test`` lists of ``{"image": ..., "label": ...}``) is accepted too and
mapped to one segmentation task ``segmentation``.

:func:`load_manifest` checks the structure only (it never opens the image files, which is
the job of :func:`client.manifest_check.check_manifest`) and reports every problem at once
in one :class:`client.errors.ManifestError`, each naming the case and field and the fix.

This module reads the file; the rest lives in modules of one job each, whose public names
are importable from here: the models (:mod:`client.manifest_models`), the problems and
their messages (:mod:`client.manifest_problems`), the checks of the raw data
(:mod:`client.manifest_raw`), datalists (:mod:`client.manifest_datalist`) and YAML
(:mod:`client.manifest_yaml`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from client.errors import ManifestError
from client.manifest_datalist import from_datalist, is_datalist
from client.manifest_models import (
    SPLITS,
    Case,
    SiteManifest,
    Split,
    SurvivalLabel,
    TaskDeclaration,
    TaskKind,
)
from client.manifest_problems import ManifestProblem
from client.manifest_raw import ManifestParse, check_top_level
from client.manifest_yaml import (
    MAX_MANIFEST_DEPTH,
    ManifestYAMLLoader,
    RefusedYAMLError,
    manifest_yaml,
    too_deep,
)
from unicon_model.config_io import document_format, parse_document, suffix_list

__all__ = [
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DEPTH",
    "SPLITS",
    "Case",
    "ManifestParse",
    "ManifestProblem",
    "SiteManifest",
    "Split",
    "SurvivalLabel",
    "TaskDeclaration",
    "TaskKind",
    "load_manifest",
    "manifest_yaml",
    "parse_manifest",
    "validate_manifest",
]

logger = logging.getLogger(__name__)

_SUFFIXES = (".yaml", ".yml", ".json")

MAX_MANIFEST_BYTES = 16 << 20
"""Largest manifest file read (bytes); larger files are refused before parsing."""


def _read_bounded(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``path`` (so that a larger file shows as too large)."""
    with path.open("rb") as handle:
        return handle.read(limit + 1)


def _parse(path: Path) -> tuple[Any, list[ManifestProblem]]:
    """The parsed file, or the problem preventing it."""
    kind = document_format(path, _SUFFIXES)
    if not path.exists():
        return None, [ManifestProblem("", f"the manifest file {path} does not exist")]
    if path.is_dir():
        message = f"{path} is a folder; pass the manifest file, e.g. {path / 'manifest.yaml'}"
        return None, [ManifestProblem("", message)]
    if not path.is_file():
        return None, [ManifestProblem("", f"{path} is not a regular file; pass the manifest file")]
    if kind is None:
        message = f"{path}: unknown manifest format {path.suffix!r}; use {suffix_list(_SUFFIXES)}"
        return None, [ManifestProblem("", message)]
    try:
        raw = _read_bounded(path, MAX_MANIFEST_BYTES)
    except OSError as e:
        return None, [ManifestProblem("", f"cannot read {path}: {e.strerror or e}")]
    if len(raw) > MAX_MANIFEST_BYTES:
        message = (
            f"{path} is larger than {MAX_MANIFEST_BYTES // (1 << 20)} MiB, the limit for a "
            "manifest; list the cases only (image data belongs in the image files)"
        )
        return None, [ManifestProblem("", message)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [ManifestProblem("", f"cannot read {path}: not UTF-8 text ({e.reason})")]
    try:
        # ManifestYAMLLoader is a SafeLoader: no Python objects, no aliases, bounded depth
        data = parse_document(text, kind, yaml_loader=ManifestYAMLLoader)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        return None, [ManifestProblem("", f"{path.name} is not valid JSON ({where}): {e.msg}")]
    except RefusedYAMLError as e:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return None, [ManifestProblem("", f"{path} is refused{where}: {e.problem}")]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(e, "problem", None) or str(e)
        return None, [ManifestProblem("", f"{path.name} is not valid YAML{where}: {reason}")]
    except RecursionError:
        data = None
        deep = True
    else:
        deep = too_deep(data, MAX_MANIFEST_DEPTH)
    if deep:
        message = (
            f"{path} is refused: its content is nested more than {MAX_MANIFEST_DEPTH} levels "
            "deep; a manifest needs only a few levels"
        )
        return None, [ManifestProblem("", message)]
    if data is None:
        return None, [ManifestProblem("", f"{path.name} is empty; write site, tasks and cases")]
    return data, []


def validate_manifest(path: str | Path) -> tuple[SiteManifest | None, list[ManifestProblem]]:
    """Read and validate a manifest, returning every problem instead of raising.

    Parameters
    ----------
    path
        As :func:`parse_manifest`.

    Returns
    -------
    manifest
        The manifest, or ``None`` when there is any problem.
    problems
        Every structural problem, each naming the case and field.
    """
    result = parse_manifest(path)
    return result.manifest, result.problems


def parse_manifest(path: str | Path) -> ManifestParse:
    """Read and validate a manifest, keeping the valid part when there are problems.

    ``unicon site check`` uses the valid part to check the files of every case whose entry
    is valid in the same run that reports the manifest's field errors.

    Parameters
    ----------
    path
        The manifest file (``.yaml``, ``.yml`` or ``.json``; a MONAI/Decathlon datalist JSON
        is accepted).

    Returns
    -------
    ManifestParse
        The manifest (``None`` on any problem), every problem, and the valid part.
    """
    path = Path(path)
    data, problems = _parse(path)
    if problems:
        return ManifestParse(None, problems)
    if is_datalist(data):
        data, problems = from_datalist(data, path)
        if problems:
            result = check_top_level(data, path.absolute().parent)
            named = any(p.field in ("name", "") and "site name" in p.message for p in problems)
            rest = [p for p in result.problems if not (named and p.field == "site")]
            return ManifestParse(None, problems + rest, result.parsed, False)
    return check_top_level(data, path.absolute().parent)


def load_manifest(path: str | Path) -> SiteManifest:
    """Load and validate a site manifest; image files are not opened.

    Parameters
    ----------
    path
        The manifest file (``.yaml``, ``.yml`` or ``.json``), or a MONAI / Medical
        Segmentation Decathlon datalist JSON.

    Returns
    -------
    SiteManifest
        With ``root`` set to the manifest's folder.

    Raises
    ------
    ManifestError
        Listing every problem at once (missing or unreadable file, syntax error, wrong
        types, unknown split, labels of undeclared tasks, invalid labels, duplicate ids,
        cases without images), each naming the case and field.
    """
    manifest, problems = validate_manifest(path)
    if manifest is None:
        raise ManifestError([str(p) for p in problems], source=str(path))
    counts = manifest.counts()["cases"]
    logger.info(
        "loaded manifest %s: site %s, %d task(s), %d case(s) (%s)",
        path,
        manifest.site,
        len(manifest.tasks),
        len(manifest.cases),
        ", ".join(f"{split} {n}" for split, n in counts.items()),
    )
    return manifest
