"""Site folders and manifests of the baselines: the pooled site and what each site can train."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from client.manifest import load_manifest, manifest_yaml
from client.site_folder import manifest_in
from simulations.baseline_plans import BaselineError
from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


def write_pooled_site(site_dirs: Sequence[Path], out: Path) -> Path:
    """One site folder whose manifest lists every site's cases (absolute file paths).

    Case ids are prefixed by the site folder's name when two sites use the same id.

    Raises
    ------
    BaselineError
        If the sites declare the same task differently.
    """
    tasks: dict[str, Any] = {}
    cases: list[dict[str, Any]] = []
    paths = {d: manifest_in(d) for d in site_dirs}
    manifests = {d: _raw_manifest(p) for d, p in paths.items()}
    ids = [c["id"] for m in manifests.values() for c in m["cases"]]
    clash = len(ids) != len(set(ids))
    for folder, manifest in manifests.items():
        for name, task in manifest.get("tasks", {}).items():
            if tasks.setdefault(name, task) != task:
                raise BaselineError(
                    f"{paths[folder]}: task {name!r} is declared differently at "
                    "another site; the pooled (centralised) baseline needs one definition"
                )
        root = folder.resolve()
        for case in manifest["cases"]:
            pooled = copy.deepcopy(case)
            if clash:
                pooled["id"] = f"{manifest['site']}-{case['id']}"
            pooled["images"] = {k: str(root / v) for k, v in case["images"].items()}
            for name, label in case.get("labels", {}).items():
                if isinstance(label, str) and tasks.get(name, {}).get("kind") == "segmentation":
                    pooled["labels"][name] = str(root / label)
            cases.append(pooled)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.yaml"
    path.write_text(manifest_yaml({"site": "pooled", "tasks": tasks, "cases": cases}))
    return out


def site_cases(site_dir: Path) -> list[dict[str, Any]]:
    """The cases of a site folder's manifest, as plain dictionaries."""
    cases: list[dict[str, Any]] = _raw_manifest(manifest_in(site_dir))["cases"]
    return cases


def _raw_manifest(path: Path) -> dict[str, Any]:
    """A manifest's plain content, read only after the site's own validation accepted it.

    :func:`client.manifest.load_manifest` refuses oversized files, YAML aliases, deep nesting
    and bad names first, so the plain re-read below cannot blow up.
    """
    load_manifest(path)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    return raw


def count_test_cases(cases: Sequence[Mapping[str, Any]], inputs: Sequence[str]) -> int:
    """Number of ``test`` cases that have every one of ``inputs``."""
    return sum(
        1 for c in cases if c.get("split") == "test" and all(k in c["images"] for k in inputs)
    )


def site_can_train(cases: Sequence[Mapping[str, Any]], plan: Plan, index: int) -> bool:
    """Whether a site has a ``train`` case for stage ``index``: its inputs and a label."""
    modalities = plan.modalities_until(index)
    needed = [modalities[m].input_keys for m in plan.stage_modalities(index)]
    tasks = plan.stages[index].objective_tasks
    return any(
        c.get("split") == "train"
        and all(all(k in c["images"] for k in keys) for keys in needed)
        and any(t in c.get("labels", {}) for t in tasks)
        for c in cases
    )
