"""Baselines of ``unicon simulate --compare``, run on the same site folders as UNICON.

Each baseline is a plan transform and/or a different set of sites, run through the same
coordinator and ClientApp (in-process grid), so only the method differs:

- ``naive``: sequential fine-tuning. Every stage trains the shared backbone, the adapters of
  the modalities it trains on and its objective heads, with no regulariser: what parameter
  isolation and regularisation protect against.
- ``ewc`` / ``lwf``: the same shared trainable backbone with elastic weight consolidation or
  learning without forgetting from stage 2 on (regularisation only, no isolation).
- ``centralised``: the UNICON plan on one site that holds every site's cases (upper bound).
- ``local``: the UNICON plan at each site alone (no federation); a site skips the stages it
  has no data for. Pooled metrics are test-case-weighted means over the sites.
- ``no-pet``: every stage that adds a modality with new inputs (PET) instead adds the same
  route on the old inputs only (CT), trained the same way: what the new images add. The
  CT-only route trains at every site with CT, so it sees at least as many cases as the PET
  route.
- ``single-task``: every stage after the first, alone, on a fresh model: its modalities
  (without ``init_from``) and tasks added anew, backbone + modalities + heads trained from
  scratch with the stage's own rounds, epochs, batch size, optimiser, privacy and secure
  aggregation (the same budget), federated over the same sites: each later task's
  "respective baseline". A column's value is the metric when its run ends, carried to later
  stages (separate models forget nothing). The first stage is not rerun: UNICON's first
  stage is already a single-task run, so those columns are left empty.
- ``unet``: a plain MONAI ``BasicUNet`` per segmentation route, trained centrally on the
  pooled cases (:mod:`simulations.unet_baseline`); other tasks have no column.

The parts: :mod:`simulations.baseline_plans` (the plan transforms),
:mod:`simulations.baseline_sites` (the pooled site, what each site can train),
:mod:`simulations.baseline_runs` (in-process runs, results assembled from several runs),
:mod:`simulations.baseline_local` and :mod:`simulations.baseline_single`; their public names
stay importable from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from client.site_folder import check_unique_sites
from server.registry import Registry
from simulations.baseline_local import run_local
from simulations.baseline_plans import (
    ABLATION_SUFFIX,
    BaselineError,
    analytic_segmentation_plan,
    shared_backbone_plan,
    single_task_plans,
    without_new_inputs_plan,
    without_secure_aggregation,
)
from simulations.baseline_runs import federate, registry_result
from simulations.baseline_single import run_single_task
from simulations.baseline_sites import write_pooled_site
from simulations.report import MethodResult
from simulations.unet_baseline import run_unet
from unicon_model.model import UniconModel

__all__ = [
    "ABLATION_SUFFIX",
    "EWC_WEIGHT",
    "LWF_WEIGHT",
    "METHODS",
    "BaselineError",
    "Clock",
    "analytic_segmentation_plan",
    "final_model",
    "parse_methods",
    "run_baseline",
    "run_centralised",
    "run_federated",
    "run_local",
    "run_single_task",
    "run_unet",
    "shared_backbone_plan",
    "single_task_plans",
    "without_new_inputs_plan",
    "without_secure_aggregation",
    "write_pooled_site",
]

logger = logging.getLogger(__name__)

METHODS = (
    "naive",
    "ewc",
    "lwf",
    "centralised",
    "local",
    "no-pet",
    "single-task",
    "unet",
    "analytic-seg",
)
"""Baselines ``--compare`` knows, in the order they run (``analytic-seg`` is UNICON itself
with its segmentation heads fitted analytically, a variant rather than a baseline)."""

EWC_WEIGHT = 100.0
LWF_WEIGHT = 1.0


class Clock:
    """Seconds since construction: one method's wall time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the clock was made."""
        return time.perf_counter() - self.started


def run_federated(
    name: str, raw: dict[str, Any], site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """A plan transform run over all the sites."""
    registry = federate(raw, site_dirs, work / name)
    return registry_result(name, registry, raw["name"], wall())


def final_model(registry_root: Path, plan_name: str) -> UniconModel:
    """The model of the last stage of ``plan_name`` completed in a registry.

    ``run_federated(name, raw, sites, work, ...)`` (and :func:`run_baseline` for ``naive``,
    ``ewc``, ``lwf`` and ``no-pet``) keeps its registry in ``work/<name>/registry``;
    ``plan_name`` is the plan's name as run (``raw["name"]``; ``<plan>-no-pet`` for the
    ``no-pet`` baseline, see :func:`without_new_inputs_plan`).

    Raises
    ------
    BaselineError
        If ``registry_root`` holds no registry or no stage of ``plan_name`` completed there.
    """
    if not (registry_root / "versions").is_dir():
        raise BaselineError(f"{registry_root}: no registry there; run the method first")
    registry = Registry(registry_root)
    completed = registry.progress(plan_name).completed
    if not completed:
        raise BaselineError(
            f"{registry_root}: plan {plan_name!r} completed no stage "
            f"(plans there: {registry.plans()})"
        )
    model, _ = registry.load(completed[-1].version)
    return model


def run_centralised(
    raw: dict[str, Any],
    site_dirs: Sequence[Path],
    work: Path,
    wall: Callable[[], float],
    held_out: Sequence[Path] = (),
) -> MethodResult:
    """The plan on one site holding every site's cases.

    ``held_out`` sites (the plan's ``holdout_sites``) are not pooled: they stay sites of
    their own, which the coordinator only evaluates (the unseen hospital).
    """
    pooled = write_pooled_site(site_dirs, work / "centralised" / "data" / "pooled")
    single = without_secure_aggregation(raw)
    registry = federate(single, [pooled, *held_out], work / "centralised")
    return registry_result("centralised", registry, single["name"], wall())


def run_baseline(
    method: str,
    raw: dict[str, Any],
    site_dirs: Sequence[Path],
    work: Path,
    wall: Callable[[], float],
) -> MethodResult:
    """Run one baseline of :data:`METHODS` on the UNICON plan ``raw`` over ``site_dirs``.

    The plan's ``[evaluation] holdout_sites`` never train: the federated baselines leave
    them to the coordinator (which scores them as the unseen hospital), ``centralised`` keeps
    them out of the pooled site and scores them, ``local`` and ``unet`` run without them.

    Raises
    ------
    BaselineError
        If ``method`` is unknown or cannot run on this plan/sites.
    """
    holdout = set((raw.get("evaluation") or {}).get("holdout_sites") or ())
    names = check_unique_sites(site_dirs) if holdout else {}
    held_out = [d for d in site_dirs if names.get(Path(d)) in holdout]
    training = [d for d in site_dirs if d not in held_out]
    if method == "centralised":
        return run_centralised(raw, training, work, wall, held_out)
    if method == "local":
        return run_local({k: v for k, v in raw.items() if k != "evaluation"}, training, work, wall)
    if method == "unet":
        return run_unet(raw, training, work, wall)
    if method == "naive":
        return run_federated(
            method, shared_backbone_plan(raw, regulariser=None), site_dirs, work, wall
        )
    if method == "ewc":
        plan = shared_backbone_plan(raw, regulariser={"kind": "ewc", "weight": EWC_WEIGHT})
        return run_federated(method, plan, site_dirs, work, wall)
    if method == "lwf":
        plan = shared_backbone_plan(raw, regulariser={"kind": "lwf", "weight": LWF_WEIGHT})
        return run_federated(method, plan, site_dirs, work, wall)
    if method == "no-pet":
        return run_federated(method, without_new_inputs_plan(raw), site_dirs, work, wall)
    if method == "single-task":
        return run_single_task(raw, site_dirs, work, wall)
    if method == "analytic-seg":
        return run_federated(method, analytic_segmentation_plan(raw), site_dirs, work, wall)
    raise BaselineError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")


def parse_methods(text: str) -> list[str]:
    """``all`` or a comma-separated list of :data:`METHODS` (validated, in run order).

    Raises
    ------
    BaselineError
        Naming every unknown method at once.
    """
    wanted = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise BaselineError(
            f"unknown baseline(s) {unknown}; choose from {', '.join(METHODS)} or 'all'"
        )
    return [m for m in METHODS if m in wanted]
