"""Incremental analytic stages measured: new hospitals over three stages vs one solve.

Target (issue 13): the analytic segmentation head solved from statistics added over three
stages (``update_analytic``) equals one solve on all the data, max abs weight difference
≤ :data:`TARGET_MAX_DIFFERENCE`. :func:`bench_incremental` takes the analytic branch plan of
:mod:`simulations.bench_analytic_seg` that was chosen on val (one stage, all sites) and runs it
again as one stage per hospital: the head on the first site alone, then each further stage an
update that only the newly connected hospital joins (those already counted are refused), with
the coordinator and the in-process sites of a normal run. It reports the largest difference
between the final head's weights and bias and the one-stage head's, each stage's sites, and
both heads' pooled test Dice.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["TARGET_MAX_DIFFERENCE", "bench_incremental", "incremental_plan"]

TARGET_MAX_DIFFERENCE = 1e-4
"""The target: incremental vs one solve, max abs weight difference."""


def incremental_plan(raw: Mapping[str, Any], sites: int) -> dict[str, Any]:
    """The one-stage analytic plan ``raw`` as one stage per site: its stage on the first
    site, then ``sites - 1`` update stages of its analytic heads (``min_sites = 1`` each)."""
    out = copy.deepcopy(dict(raw))
    (first,) = out["stages"]
    heads = [t["name"] for t in first["add_tasks"]]
    first["min_sites"] = 1
    updates = [
        {"name": f"{first['name']}-add-{k}", "update_analytic": heads, "rounds": 1, "min_sites": 1}
        for k in range(2, sites + 1)
    ]
    out["stages"] = [first, *updates]
    out["name"] = f"{raw['name'][:48]}-incremental"
    return out


def _head_state(model: torch.nn.Module, task: str) -> dict[str, torch.Tensor]:
    return {
        k: v.double()
        for k, v in model.state_dict().items()
        if k.startswith(f"tasks.{task}.") and k.rsplit(".", 1)[-1] in ("weight", "bias")
    }


def bench_incremental(
    raw: Mapping[str, Any], sites: Sequence[Path], work: Path, reference: Path, task: str
) -> dict[str, Any]:
    """Run :func:`incremental_plan` of ``raw`` one hospital more per stage; compare its head.

    Parameters
    ----------
    raw
        A one-stage analytic plan (the chosen branch of the analytic-seg bench).
    sites
        The hospitals, in the order they join.
    work
        Where the run's registry and the sites' state go (``work/incremental``).
    reference
        The registry of ``raw`` run in one stage over all ``sites``.
    task
        The analytic task compared.

    Returns
    -------
    dict
        ``max_abs_difference`` (weights and bias), ``target``, ``met``, ``stage_sites``
        (each stage's aggregated sites), ``dice`` and ``reference_dice`` (pooled test Dice
        of the route) and ``stages``.
    """
    from server.coordinator import Coordinator
    from server.registry import Registry
    from simulations.inprocess import InProcessTransport
    from unicon_model.schema import validate_plan

    plan = validate_plan(incremental_plan(raw, len(sites)))
    registry = Registry(work / "incremental" / "registry")
    state = work / "incremental" / "state"
    for k, stage in enumerate(plan.stages):
        transport = InProcessTransport(list(sites[: k + 1]), state)
        Coordinator(plan, registry, transport, site_wait=0).run(only_stage=stage.name)
    completed = registry.progress(plan.name).completed
    final, _ = registry.load(completed[-1].version)
    one = Registry(reference)
    one_plan = str(raw["name"])
    single, _ = one.load(one.progress(one_plan).completed[-1].version)
    mine, theirs = _head_state(final, task), _head_state(single, task)
    if set(mine) != set(theirs) or not mine:
        raise ValueError(
            f"the heads of {task!r} differ in keys: {sorted(mine)} vs {sorted(theirs)}"
        )
    difference = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    rounds = [r for r in registry.metrics(plan.name) if r.get("kind") == "round"]
    route = next(r for r in registry.results(plan.name)["R"][-1] if r.startswith(f"{task}@"))
    return {
        "max_abs_difference": difference,
        "target": TARGET_MAX_DIFFERENCE,
        "met": bool(difference <= TARGET_MAX_DIFFERENCE),
        "stage_sites": {str(r["stage"]): list(r.get("sites", [])) for r in rounds},
        "dice": float(registry.results(plan.name)["R"][-1][route]),
        "reference_dice": float(one.results(one_plan)["R"][-1][route]),
        "stages": len(plan.stages),
    }
