"""MONAI / Medical Segmentation Decathlon datalists read as site manifests.

A datalist (``dataset.json`` with ``training``, ``validation`` and ``test`` lists of
``{"image": ..., "label": ...}``) becomes the raw data of a site manifest with one
segmentation task ``segmentation`` (:func:`from_datalist`), checked then like any manifest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client.manifest_problems import ManifestProblem, short
from unicon_model.names import NAME_RULE, is_valid_name

logger = logging.getLogger(__name__)

_DATALIST_SECTIONS = {"training": "train", "validation": "val", "test": "test"}


def is_datalist(data: Any) -> bool:
    """Whether parsed manifest data is a datalist (``training`` and no ``cases``)."""
    return isinstance(data, dict) and "training" in data and "cases" not in data


def _datalist_labels(raw: Any) -> tuple[list[str] | None, list[ManifestProblem]]:
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, [ManifestProblem("labels", 'must be a mapping {"0": "background", ...}')]
    try:
        ordered = sorted((int(key), str(name)) for key, name in raw.items())
    except (TypeError, ValueError):
        message = f"keys must be integers as strings, e.g. {{'0': 'background'}}, got {list(raw)}"
        return None, [ManifestProblem("labels", message)]
    if [key for key, _ in ordered] != list(range(len(ordered))):
        message = f"keys must be 0..{len(ordered) - 1} without gaps, got {[k for k, _ in ordered]}"
        return None, [ManifestProblem("labels", message)]
    return [name for _, name in ordered], []


def _image_keys(data: Mapping[str, Any]) -> list[str]:
    modality = data.get("modality")
    if isinstance(modality, dict) and modality:
        try:
            names = [
                str(v).strip().lower() for _, v in sorted(modality.items(), key=lambda i: int(i[0]))
            ]
        except (TypeError, ValueError):
            names = [str(v).strip().lower() for v in modality.values()]
        if all(names) and len(set(names)) == len(names):
            return names
    return ["image"]


def _datalist_site(name: Any, path: Path) -> tuple[str, list[ManifestProblem]]:
    """The site name of a datalist: its ``name`` (else the file stem) in the name rule's case.

    Only letter case, spaces and dots are adapted (``Task02_Heart`` -> ``task02_heart``);
    any other character outside the name rule (e.g. zero-width or bidi controls) is refused.
    """
    given = name.strip() if isinstance(name, str) and name.strip() else path.stem
    field = "name" if isinstance(name, str) and name.strip() else ""
    site = re.sub(r"[\s.]+", "-", given.lower()).strip("-")
    if is_valid_name(site):
        if site != given:
            logger.info("%s: using the site name %r for the datalist %r", path, site, given)
        return site, []
    what = f"the datalist name {short(given)}" if field else f"the file name stem {given!r}"
    message = (
        f"{what} gives no valid site name: use {NAME_RULE}; rename it, or write a site "
        "manifest with site: <name>"
    )
    return given, [ManifestProblem(field, message)]


def _case_id(path: str) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".npy", ".dcm", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _datalist_case(
    item: Any, where: str, split: str, keys: list[str]
) -> tuple[dict[str, Any] | None, ManifestProblem | None]:
    """One datalist item (at ``where``) as a raw case of ``split``, or why it is not one."""
    if isinstance(item, str):
        item = {"image": item}
    if not isinstance(item, dict) or "image" not in item:
        message = f'must be {{"image": PATH, "label": PATH}} or a path, got {short(item)}'
        return None, ManifestProblem(where, message)
    image = item["image"]
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
        message = f"must be a path or a list of paths, got {short(image)}"
        return None, ManifestProblem(f"{where}.image", message)
    if len(paths) == 1:
        images = {keys[0] if len(keys) == 1 else "image": paths[0]}
    elif len(paths) == len(keys):
        images = dict(zip(keys, paths, strict=True))
    else:
        images = {f"image{j}": p for j, p in enumerate(paths)}
    case: dict[str, Any] = {"id": _case_id(paths[0]), "split": split, "images": images}
    if item.get("label") is not None:
        case["labels"] = {"segmentation": item["label"]}
    return case, None


def from_datalist(
    data: Mapping[str, Any], path: Path
) -> tuple[dict[str, Any], list[ManifestProblem]]:
    """A MONAI / Decathlon datalist as a raw site manifest.

    Parameters
    ----------
    data
        The datalist's parsed content.
    path
        The datalist file (its stem names the site when the datalist has no ``name``).

    Returns
    -------
    manifest
        The raw manifest data (``site``, ``tasks``, ``cases``).
    problems
        What could not be converted, each naming the datalist's field.
    """
    problems: list[ManifestProblem] = []
    labels, label_problems = _datalist_labels(data.get("labels"))
    problems += label_problems
    keys = _image_keys(data)
    site, site_problems = _datalist_site(data.get("name"), path)
    problems += site_problems
    cases: list[dict[str, Any]] = []
    labelled = False
    for section, split in _DATALIST_SECTIONS.items():
        items = data.get(section)
        if items is None:
            continue
        if not isinstance(items, list):
            problems.append(ManifestProblem(section, f"must be a list, got {short(items)}"))
            continue
        for i, item in enumerate(items):
            case, problem = _datalist_case(item, f"{section}[{i}]", split, keys)
            if problem is not None:
                problems.append(problem)
            elif case is not None:
                labelled = labelled or "labels" in case
                cases.append(case)
    tasks: dict[str, Any] = {}
    if labels is not None:
        tasks["segmentation"] = {"kind": "segmentation", "labels": labels}
    elif labelled and not label_problems:
        logger.warning(
            "%s: the datalist has masks but no 'labels' mapping; assuming binary masks "
            "[background, foreground]",
            path,
        )
        tasks["segmentation"] = {"kind": "segmentation", "labels": ["background", "foreground"]}
    return {"site": site, "tasks": tasks, "cases": cases}, problems
