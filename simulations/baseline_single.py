"""The ``single-task`` baseline: each stage after the first alone, from scratch, federated.

See :func:`simulations.baseline_plans.single_task_plans` for the plans; a column's value is
the metric when its run ends, carried to later stages (separate models forget nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from simulations.baseline_plans import single_task_plans
from simulations.baseline_runs import assembled_results, federate, round_records
from simulations.report import MethodResult, method_result
from simulations.unet_baseline import carried_matrix
from unicon_model.schema import validate_plan

logger = logging.getLogger(__name__)


def run_single_task(
    raw: dict[str, Any], site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """Each stage after the first alone, from scratch, federated; see :func:`single_task_plans`.

    R[stage, column]: the column's pooled metric at the end of the run of the stage that adds
    it, carried to later stages; bytes and ε are summed over the runs per site.
    """
    plan = validate_plan(raw)
    stages = plan.stage_names
    pooled: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    pooled_ci: dict[str, list[float]] = {}
    per_site_ci: dict[str, dict[str, list[float]]] = {}
    introduced: dict[str, int] = {}
    bytes_up: dict[str, int] = {}
    bytes_down: dict[str, int] = {}
    epsilon: dict[str, float] = {}
    rounds: list[dict[str, Any]] = []
    for index, single in single_task_plans(raw):
        registry = federate(single, site_dirs, work / "single-task" / str(index))
        results = registry.results(single["name"])
        rows = results.get("R", [])
        for column, value in (rows[-1] if rows else {}).items():
            pooled[column] = value
            introduced.setdefault(column, index)
        for site, by_stage in results.get("R_per_site", {}).items():
            per_site.setdefault(site, {}).update(by_stage.get(stages[index], {}))
        ci_rows = results.get("R_ci", [])
        pooled_ci.update(ci_rows[-1] if ci_rows else {})
        for site, by_stage in results.get("R_per_site_ci", {}).items():
            per_site_ci.setdefault(site, {}).update(by_stage.get(stages[index], {}))
        for site, n in results.get("bytes_up", {}).items():
            bytes_up[site] = bytes_up.get(site, 0) + int(n)
        for site, n in results.get("bytes_down", {}).items():
            bytes_down[site] = bytes_down.get(site, 0) + int(n)
        for site, eps in results.get("epsilon", {}).items():
            epsilon[site] = epsilon.get(site, 0.0) + float(eps or 0.0)
        rounds += round_records(registry, single["name"])
    rows, site_rows = carried_matrix(stages, introduced, pooled, per_site)
    rows_ci, site_rows_ci = carried_matrix(stages, introduced, pooled_ci, per_site_ci)
    registry_like = assembled_results(
        stages,
        rows,
        site_rows,
        rows_ci,
        site_rows_ci,
        bytes_up=bytes_up,
        bytes_down=bytes_down,
        epsilon=epsilon,
    )
    return method_result("single-task", registry_like, rounds, wall())
