"""The ``unet`` baseline of ``unicon simulate --compare``: a plain MONAI U-Net, centralised.

What a user would pick instead of UNICON for a segmentation task: a MONAI
:class:`~monai.networks.nets.BasicUNet` trained centrally on the pooled training cases of
every site, one network per segmentation route ``task@modality`` of the plan (CT input for
``lesion-seg@ct``; CT and PET stacked for ``lesion-seg@pet``, on the sites that have PET).

- Data: each site's cases read with :func:`client.data.build_dataset`, so the network sees
  exactly the preprocessed volumes (patch size, spacing, CT window, channel order) that
  UNICON's sites train and evaluate on.
- Training: DiceCE loss (softmax, one-hot targets), Adam, random flips along each spatial
  axis (MONAI ``RandFlipd`` on image and mask together), seeded from the plan's seed. With a
  validation split, the weights of the epoch with the best pooled validation Dice are kept
  (checked every ``eval_every`` epochs).
- Evaluation: :func:`unicon_model.metrics.segmentation.mean_dice` (foreground Dice, MONAI
  ``compute_dice`` with empty targets ignored), the function the sites use for UNICON's R,
  computed over the pooled test cases (and per site for ``R_per_site``).

The images leave the sites in this baseline; it is a reference, not a federated method.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from client.data import CaseDataset, build_dataset, label_key
from client.manifest import load_manifest
from client.site_folder import check_unique_sites, manifest_in
from simulations.report import MethodResult, method_result
from simulations.unet_training import (
    UNET_EPOCHS,
    Cases,
    UNetBaselineError,
    UNetSettings,
    predict_labels,
    score,
    train_unet,
)
from unicon_model.schema import ModalitySpec, Plan, TaskSpec, validate_plan

logger = logging.getLogger(__name__)

__all__ = [
    "UNET_EPOCHS",
    "Cases",
    "Route",
    "UNetBaselineError",
    "UNetSettings",
    "carried_matrix",
    "carried_rows",
    "load_route",
    "predict_labels",
    "run_unet",
    "score",
    "segmentation_routes",
    "train_unet",
]


@dataclass(frozen=True)
class Route:
    """One segmentation route of a plan: the task, the modality, and the stage adding it."""

    task: TaskSpec
    modality: ModalitySpec
    stage: int

    @property
    def column(self) -> str:
        """The ``task@modality`` column of R."""
        return f"{self.task.name}@{self.modality.name}"


def segmentation_routes(plan: Plan) -> list[Route]:
    """Every ``segmentation task@modality`` a stage of ``plan`` trains, in stage order."""
    routes: dict[str, Route] = {}
    for index, stage in enumerate(plan.stages):
        tasks = plan.tasks_until(index)
        modalities = plan.modalities_until(index)
        for task_name in stage.objective_tasks:
            task = tasks.get(task_name)
            if task is None or task.kind != "segmentation":
                continue
            for modality in plan.stage_modalities(index):
                route = Route(task, modalities[modality], index)
                routes.setdefault(route.column, route)
    return list(routes.values())


def _stack(datasets: Sequence[tuple[str, CaseDataset]], task: str) -> Cases:
    images: list[Tensor] = []
    masks: list[Tensor] = []
    sites: list[str] = []
    for site, dataset in datasets:
        for sample in dataset.samples:
            if not bool(sample[label_key(task, "has")]):
                continue
            images.append(sample["image"])
            masks.append(sample[label_key(task, "mask")])
            sites.append(site)
    if not images:
        return Cases(torch.empty(0), torch.empty(0, dtype=torch.long), [])
    return Cases(torch.stack(images).float(), torch.stack(masks).long(), sites)


def load_route(
    plan: Plan, route: Route, site_dirs: Sequence[Path], cache_dir: Path | None = None
) -> dict[str, Cases]:
    """The pooled ``train``, ``val`` and ``test`` cases of ``route`` over every site.

    Each site's cases are read with :func:`client.data.build_dataset` (the site's own
    preprocessing); a site without the route's images contributes nothing.
    """
    names = check_unique_sites(site_dirs)
    manifests = {names[Path(d)]: load_manifest(manifest_in(Path(d))) for d in site_dirs}
    out: dict[str, Cases] = {}
    for split in ("train", "val", "test"):
        datasets = [
            (
                site,
                build_dataset(
                    manifest,
                    split=split,
                    modality=route.modality,
                    tasks={route.task.name: route.task},
                    data=plan.data,
                    cache_dir=cache_dir,
                ),
            )
            for site, manifest in manifests.items()
        ]
        out[split] = _stack(datasets, route.task.name)
    return out


def _per_site(model: nn.Module, cases: Cases, *, num_labels: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for site in sorted(set(cases.sites)):
        keep = torch.tensor([s == site for s in cases.sites])
        subset = Cases(cases.images[keep], cases.masks[keep], [site] * int(keep.sum()))
        out[site] = score(model, subset, num_labels=num_labels)
    return out


def _run_route(
    plan: Plan, route: Route, site_dirs: Sequence[Path], work: Path, settings: UNetSettings
) -> tuple[dict[str, Any], dict[str, float]] | None:
    """Train and score the reference U-Net of ``route``: its round record and per-site Dice.

    ``None`` (logged) when no site has a training case for the route.
    """
    started = time.perf_counter()
    cases = load_route(plan, route, site_dirs, cache_dir=work / "unet" / "cache")
    if len(cases["train"]) == 0:
        logger.warning("unet baseline: no training case for %s; skipped", route.column)
        return None
    num_labels = route.task.num_outputs
    model = train_unet(
        cases["train"],
        num_labels=num_labels,
        spatial_dims=plan.model.spatial_dims,
        settings=settings,
        val=cases["val"],
        seed=plan.model.seed,
    )
    dice = score(model, cases["test"], num_labels=num_labels)
    sites = _per_site(model, cases["test"], num_labels=num_labels)
    seconds = time.perf_counter() - started
    logger.info(
        "unet baseline %s: %d train / %d test case(s), Dice %.4f in %.1f s",
        route.column,
        len(cases["train"]),
        len(cases["test"]),
        dice,
        seconds,
    )
    record = {
        "kind": "unet",
        "stage": plan.stage_names[route.stage],
        "task": route.column,
        "train_cases": len(cases["train"]),
        "test_cases": len(cases["test"]),
        "epochs": settings.epochs,
        "dice": dice,
        "seconds": seconds,
    }
    return record, sites


def run_unet(
    raw: Mapping[str, Any],
    site_dirs: Sequence[Path],
    work: Path,
    wall: Callable[[], float],
    settings: UNetSettings | None = None,
) -> MethodResult:
    """The reference U-Net of every segmentation route of the plan, as a method's result.

    R[stage, column] holds the route's pooled test Dice from the stage that adds the route
    on (each network is separate, so nothing is forgotten); other tasks have no column.
    ``bytes_up`` is 0 per site: no model travels (the images are pooled instead).

    Raises
    ------
    UNetBaselineError
        If the plan has no segmentation route, or no site has training cases for any.
    """
    plan = validate_plan(raw)
    settings = settings or UNetSettings()
    routes = segmentation_routes(plan)
    if not routes:
        raise UNetBaselineError(
            f"plan {plan.name!r} trains no segmentation task: the unet baseline has nothing "
            "to compare"
        )
    stages = plan.stage_names
    pooled: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    introduced: dict[str, int] = {}
    rounds: list[dict[str, Any]] = []
    names = check_unique_sites(site_dirs)
    for route in routes:
        result = _run_route(plan, route, site_dirs, work, settings)
        if result is None:
            continue
        record, sites = result
        pooled[route.column] = record["dice"]
        for site, value in sites.items():
            per_site.setdefault(site, {})[route.column] = value
        introduced[route.column] = route.stage
        rounds.append(record)
    if not pooled:
        raise UNetBaselineError(
            "no site has training cases with a mask for any segmentation route "
            f"({', '.join(r.column for r in routes)})"
        )
    rows, site_rows = carried_matrix(stages, introduced, pooled, per_site)
    registry_like = {
        "stages": stages,
        "R": rows,
        "R_per_site": site_rows,
        "bytes_up": dict.fromkeys(names.values(), 0),
        "bytes_down": dict.fromkeys(names.values(), 0),
        "epsilon": {},
    }
    return method_result("unet", registry_like, rounds, wall())


_Value = TypeVar("_Value")


def carried_rows(
    stages: int, introduced: Mapping[str, int], values: Mapping[str, _Value]
) -> list[dict[str, _Value]]:
    """Rows of R (or of its intervals) for separately trained models: each column's value
    from the stage that introduces it on."""
    return [
        {c: v for c, v in values.items() if c in introduced and introduced[c] <= i}
        for i in range(stages)
    ]


def carried_matrix(
    stages: Sequence[str],
    introduced: Mapping[str, int],
    pooled: Mapping[str, _Value],
    per_site: Mapping[str, Mapping[str, _Value]],
) -> tuple[list[dict[str, _Value]], dict[str, dict[str, dict[str, _Value]]]]:
    """``R`` and ``R_per_site`` (site -> stage -> row) of :func:`carried_rows`."""
    rows = carried_rows(len(stages), introduced, pooled)
    sites = {
        site: dict(zip(stages, carried_rows(len(stages), introduced, row), strict=True))
        for site, row in per_site.items()
    }
    return rows, sites
