"""PET gain on the lesions that are barely visible on CT (the generator's ``subtle`` ones).

:mod:`simulations.synthetic` draws about a quarter of the lesions with a CT contrast below the
noise (5–12 HU) but hot on PET, and writes their voxels to ``truth/subtle/<case>.nii.gz`` in
each site folder (never in the manifest: sites do not train on it). This module scores two
routes of the same task on the same test cases: the route with the new inputs (UNICON's
``lesion-seg@pet``, inputs CT + PET) and its ablation trained on the old inputs only (the
``no-pet`` baseline's ``lesion-seg@pet-ablation``, CT alone), and returns per route, per site
and pooled over sites:

- ``dice``: the task's Dice on every test case (the mean over foreground labels of each case,
  then the mean over all the cases of all the sites, pooled case by case);
- ``subtle_recall``: the fraction of subtle-lesion voxels predicted as any lesion label,
  summed over all the cases (voxel-pooled);
- ``subtle_detection``: the fraction of subtle lesions detected. A lesion is a connected
  component (26-neighbourhood in 3D) of the subtle mask on the model's grid (two subtle
  lesions that touch count as one), and it is **detected when at least half of its voxels**
  (``min_overlap``, 0.5 by default) are predicted as lesion; ``min_overlap=0`` counts any
  predicted voxel as a detection.

and the gain of each (new-input route minus ablation). Every figure is on the patch grid the
model sees: the subtle mask goes through the same preprocessing as the case's images and
lesion mask (:func:`client.data.preprocess_files`, nearest-neighbour for masks), so a lesion
the resampling removes counts nowhere. Only sites whose test cases have every input of the
new route (the PET sites) are scored, each on the cases both routes can read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from client.data import CaseDataset, build_dataset, preprocess_files
from client.manifest import SiteManifest, load_manifest
from client.site_folder import manifest_in
from simulations.baselines import ABLATION_SUFFIX
from simulations.subtle_scoring import SiteCases, SubtleLesionError, Tally, score_sites
from unicon_model.model import UniconModel
from unicon_model.names import path_under
from unicon_model.schema import DataSpec, ModalitySpec, TaskSpec, validate_plan

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTION_OVERLAP",
    "METRICS",
    "SUBTLE_DIR",
    "RouteModel",
    "SubtleLesionError",
    "ablated_routes",
    "pet_gain_subtle",
    "subtle_lesion_gain",
]

SUBTLE_DIR = ("truth", "subtle")
"""Folder of a site folder holding ``<case id>.nii.gz``: 1 on voxels of subtle lesions."""

DETECTION_OVERLAP = 0.5
"""Default fraction of a subtle lesion's voxels that must be predicted for a detection."""

METRICS = ("dice", "subtle_recall", "subtle_detection")
"""The figures reported per route, per site and pooled, and whose gain is returned."""


@dataclass(frozen=True)
class RouteModel:
    """A model and the route ``task@modality`` of it to score."""

    model: nn.Module
    modality: ModalitySpec
    task: TaskSpec

    @property
    def route(self) -> str:
        """``task@modality``."""
        return f"{self.task.name}@{self.modality.name}"

    @classmethod
    def of(cls, model: UniconModel, route: str) -> RouteModel:
        """The route ``task@modality`` of ``model`` (a segmentation task).

        Raises
        ------
        SubtleLesionError
            If the route is malformed, the model lacks its task or modality (listing those it
            has), or the task is not a segmentation.
        """
        task, sep, modality = route.partition("@")
        if not sep or not task or not modality:
            raise SubtleLesionError(f"route {route!r} is not of the form task@modality")
        problems = []
        if modality not in model.modality_specs:
            problems.append(
                f"the model has no modality {modality!r} (it has {sorted(model.modality_specs)})"
            )
        if task not in model.task_specs:
            problems.append(f"the model has no task {task!r} (it has {sorted(model.task_specs)})")
        elif model.task_specs[task].kind != "segmentation":
            problems.append(f"task {task!r} is a {model.task_specs[task].kind}, not a segmentation")
        if problems:
            raise SubtleLesionError(f"route {route!r}: " + "; ".join(problems))
        return cls(model, model.modality_specs[modality], model.task_specs[task])


def ablated_routes(raw: Mapping[str, Any], suffix: str = ABLATION_SUFFIX) -> list[tuple[str, str]]:
    """Pairs (new-input route, its ablation) of a plan, as the ``no-pet`` baseline names them.

    For every stage that adds a modality with inputs beyond those of the modality it starts
    from (``init_from``), each segmentation task the stage trains gives the pair
    ``(task@modality, task@modality<suffix>)`` (see
    :func:`simulations.baselines.without_new_inputs_plan`).
    """
    plan = validate_plan(raw)
    known: dict[str, ModalitySpec] = {}
    pairs: list[tuple[str, str]] = []
    for index, stage in enumerate(plan.stages):
        known.update({m.name: m for m in stage.add_modalities})
        tasks = plan.tasks_until(index)
        for modality in stage.add_modalities:
            source = known.get(modality.init_from or "")
            if source is None or set(modality.input_keys) <= set(source.input_keys):
                continue
            for name in stage.objective_tasks:
                if tasks[name].kind == "segmentation":
                    pairs.append((f"{name}@{modality.name}", f"{name}@{modality.name}{suffix}"))
    return pairs


def _subset(dataset: CaseDataset, ids: Sequence[str]) -> CaseDataset:
    index = {case: i for i, case in enumerate(dataset.case_ids)}
    return CaseDataset(
        [dataset.samples[index[c]] for c in ids], modality=dataset.modality, case_ids=list(ids)
    )


def _subtle_truth(
    folder: Path,
    manifest: SiteManifest,
    case_ids: Sequence[str],
    inputs: Sequence[str],
    data: DataSpec,
) -> tuple[list[np.ndarray], list[str]]:
    """Subtle masks of ``case_ids`` on the patch grid, and the problems (missing files)."""
    cases = {c.id: c for c in manifest.cases}
    root = folder.joinpath(*SUBTLE_DIR)
    masks: list[np.ndarray] = []
    missing: list[str] = []
    for case_id in case_ids:
        path = path_under(root, f"{case_id}.nii.gz")
        if not path.is_file():
            missing.append(str(path))
            continue
        case = cases[case_id]
        arrays = preprocess_files(
            {k: manifest.resolve(case.images[k]) for k in inputs},
            {"subtle": path},
            patch_size=data.patch_size,
            spacing=data.spacing,
            ct_window=data.ct_window,
        )
        masks.append(np.rint(arrays["subtle"][0]) > 0)
    return masks, missing


def _load_sites(
    site_dirs: Sequence[Path],
    data: DataSpec,
    routes: Mapping[str, RouteModel],
    cache_dir: Path | None,
) -> list[SiteCases]:
    """The PET sites' test cases for both routes; every missing truth file reported at once."""
    pet, ablation = routes["pet"], routes["ablation"]
    sites: list[SiteCases] = []
    missing: list[str] = []
    for folder in map(Path, site_dirs):
        manifest = load_manifest(manifest_in(folder))
        read = {
            key: build_dataset(
                manifest,
                split="test",
                modality=route.modality,
                tasks={route.task.name: route.task},
                data=data,
                cache_dir=cache_dir,
            )
            for key, route in routes.items()
        }
        ids = [c for c in read["pet"].case_ids if c in set(read["ablation"].case_ids)]
        dropped = sorted(set(read["pet"].case_ids) - set(ids))
        if dropped:
            logger.warning(
                "site %s: %s cannot read test case(s) %s; scored without them",
                manifest.site,
                ablation.route,
                dropped,
            )
        if not ids:
            logger.info("site %s: no test case for %s; not scored", manifest.site, pet.route)
            continue
        truth, absent = _subtle_truth(folder, manifest, ids, pet.modality.input_keys, data)
        missing += absent
        datasets = {key: _subset(dataset, ids) for key, dataset in read.items()}
        sites.append(SiteCases(manifest.site, datasets, truth))
    if missing:
        raise SubtleLesionError(
            f"no subtle-lesion truth for {len(missing)} test case(s): {', '.join(missing)}; "
            "these masks are written by simulations.synthetic (regenerate the sites with "
            "`unicon make-data`, or generate_case/write_site of this version)"
        )
    return sites


def _gain(pet: Mapping[str, float], ablation: Mapping[str, float]) -> dict[str, float]:
    return {m: pet[m] - ablation[m] for m in METRICS}


def subtle_lesion_gain(
    site_dirs: Sequence[str | Path],
    data: DataSpec,
    pet: RouteModel,
    ablation: RouteModel,
    *,
    min_overlap: float = DETECTION_OVERLAP,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score ``pet`` and ``ablation`` on every PET site's test cases; see the module doc.

    Parameters
    ----------
    site_dirs
        Site folders written by :mod:`simulations.synthetic` (with ``truth/subtle/``).
    data
        The plan's data settings (patch size, spacing, CT window).
    pet, ablation
        The route with the new inputs and its ablation (same task).
    min_overlap
        Fraction of a subtle lesion's voxels that must be predicted for a detection, in
        [0, 1]; 0 means any predicted voxel.
    device
        Where the models run (CPU by default).
    cache_dir
        Preprocessing cache of :func:`client.data.build_dataset` (``None``: none).

    Returns
    -------
    dict
        ``routes`` (``pet``/``ablation`` route names), ``pooled`` and ``per_site``
        (``{pet, ablation: {dice, subtle_recall, subtle_detection}}``), ``gain`` and
        ``gain_per_site`` (pet minus ablation of each figure; NaN where undefined, e.g.
        without a subtle lesion), ``counts`` (test cases, cases with a subtle lesion,
        subtle lesions and voxels, pooled), ``min_overlap``.

    Raises
    ------
    SubtleLesionError
        If the routes' tasks differ, ``min_overlap`` is outside [0, 1], no site has a test
        case for ``pet``, or test cases lack their subtle truth (listing every file).
    """
    _check_routes(pet, ablation, min_overlap)
    routes = {"pet": pet, "ablation": ablation}
    sites = _load_sites([Path(d) for d in site_dirs], data, routes, cache_dir)
    if not sites:
        raise SubtleLesionError(
            f"no site has a test case with the inputs of {pet.route} "
            f"({', '.join(pet.modality.input_keys)}): nothing to compare"
        )
    pooled, per_site, counts = score_sites(
        sites, routes, min_overlap=min_overlap, device=device or torch.device("cpu")
    )
    return _report(routes, pooled, per_site, counts, min_overlap=min_overlap)


def _check_routes(pet: RouteModel, ablation: RouteModel, min_overlap: float) -> None:
    """Raise :class:`SubtleLesionError` unless the routes and ``min_overlap`` can be scored."""
    if pet.task.name != ablation.task.name:
        raise SubtleLesionError(
            f"the routes score different tasks ({pet.route} vs {ablation.route}); "
            "compare a route with its own ablation"
        )
    if not 0.0 <= min_overlap <= 1.0:
        raise SubtleLesionError(f"min_overlap must lie in [0, 1], got {min_overlap}")


def _report(
    routes: Mapping[str, RouteModel],
    pooled: Mapping[str, Tally],
    per_site: dict[str, dict[str, dict[str, float]]],
    counts: dict[str, int],
    *,
    min_overlap: float,
) -> dict[str, Any]:
    """The report of :func:`subtle_lesion_gain` from the tallies of :func:`score_sites`."""
    scores = {key: tally.scores() for key, tally in pooled.items()}
    logger.info(
        "subtle lesions: %d in %d of %d test case(s); %s vs %s: %s",
        counts["subtle_lesions"],
        counts["subtle_cases"],
        counts["cases"],
        routes["pet"].route,
        routes["ablation"].route,
        _gain(scores["pet"], scores["ablation"]),
    )
    return {
        "routes": {key: route.route for key, route in routes.items()},
        "pooled": scores,
        "per_site": per_site,
        "gain": _gain(scores["pet"], scores["ablation"]),
        "gain_per_site": {
            s: _gain(by_route["pet"], by_route["ablation"]) for s, by_route in per_site.items()
        },
        "counts": counts,
        "min_overlap": min_overlap,
    }


def pet_gain_subtle(
    raw: Mapping[str, Any],
    site_dirs: Sequence[str | Path],
    pet_model: UniconModel,
    ablation_model: UniconModel,
    *,
    min_overlap: float = DETECTION_OVERLAP,
    device: torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`subtle_lesion_gain` of every route of ``raw`` that the ``no-pet`` baseline ablates.

    Parameters
    ----------
    raw
        The UNICON plan as run (its ``data`` settings are used).
    site_dirs
        The sites to score (those whose test cases have PET are).
    pet_model, ablation_model
        UNICON's final model and the ``no-pet`` baseline's (see
        :func:`simulations.baselines.final_model`).

    Returns
    -------
    dict
        New-input route (``lesion-seg@pet``) -> the report of :func:`subtle_lesion_gain`.

    Raises
    ------
    SubtleLesionError
        If the plan ablates no segmentation route, or as :func:`subtle_lesion_gain`.
    """
    pairs = ablated_routes(raw)
    if not pairs:
        raise SubtleLesionError(
            f"plan {raw.get('name')!r} adds no modality with new inputs that a segmentation "
            "task trains on: there is no PET route to compare on subtle lesions"
        )
    data = validate_plan(raw).data
    return {
        route: subtle_lesion_gain(
            site_dirs,
            data,
            RouteModel.of(pet_model, route),
            RouteModel.of(ablation_model, twin),
            min_overlap=min_overlap,
            device=device,
        )
        for route, twin in pairs
    }
