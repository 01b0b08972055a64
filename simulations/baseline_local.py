"""The ``local`` baseline: the plan at every site alone, pooled as a test-case-weighted mean.

Each site runs the stages it has training data for (a skipped stage leaves its model as it
was); per stage and ``task@modality`` the sites' metrics are averaged weighted by their
numbers of test cases with the route's inputs (:func:`case_weighted_mean`), with an interval
from the sites' own bootstrap standard errors (:func:`pooled_ci`). Nothing leaves a site.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.site_folder import check_unique_sites
from simulations.baseline_plans import without_secure_aggregation
from simulations.baseline_runs import assembled_results, federate, round_records
from simulations.baseline_sites import count_test_cases, site_can_train, site_cases
from simulations.report import MethodResult, method_result
from unicon_model.metrics.uncertainty import pooled_interval
from unicon_model.schema import Plan, validate_plan

logger = logging.getLogger(__name__)


@dataclass
class _LocalRuns:
    """What the sites' own runs gave, per site (stage-aligned lists of rows)."""

    per_site: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    bytes_down: dict[str, int] = field(default_factory=dict)
    epsilon: dict[str, float] = field(default_factory=dict)
    weights: dict[str, dict[str, int]] = field(default_factory=dict)
    per_site_ci: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_site_se: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)


def run_local(
    raw: dict[str, Any], site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """The plan at every site alone; pooled R = test-case-weighted mean over the sites."""
    plan = validate_plan(raw)
    stages = [s.name for s in plan.stages]
    runs = _LocalRuns()
    names = check_unique_sites(site_dirs)
    for folder in site_dirs:
        _run_site(runs, raw, plan, folder, names[Path(folder)], work)
    pooled_rows: list[dict[str, float]] = []
    pooled_ci: list[dict[str, list[float]]] = []
    for i in range(len(stages)):
        row, intervals = _pooled_row(runs, i)
        pooled_rows.append(row)
        pooled_ci.append(intervals)
    registry_like = assembled_results(
        stages,
        pooled_rows,
        {s: dict(zip(stages, rows, strict=True)) for s, rows in runs.per_site.items()},
        pooled_ci,
        {s: dict(zip(stages, rows, strict=True)) for s, rows in runs.per_site_ci.items()},
        bytes_up=runs.bytes_up,
        bytes_down=runs.bytes_down,
        epsilon=runs.epsilon,
    )
    return method_result("local", registry_like, runs.rounds, wall())


def _run_site(
    runs: _LocalRuns, raw: dict[str, Any], plan: Plan, folder: Path, site: str, work: Path
) -> None:
    """Run the stages ``site`` can train, alone, and add what it gave to ``runs``."""
    stages = [s.name for s in plan.stages]
    modalities = plan.modalities_until(len(plan.stages) - 1)
    cases = site_cases(folder)
    keep = [i for i in range(len(plan.stages)) if site_can_train(cases, plan, i)]
    if not keep:
        return
    single = without_secure_aggregation(raw)
    single["stages"] = [single["stages"][i] for i in keep]
    single["name"] = f"{raw['name']}-local-{site}"
    registry = federate(single, [folder], work / "local" / site)
    results = registry.results(single["name"])
    rows = dict(zip(results["stages"], results["R"], strict=True))
    runs.per_site[site] = _carried(stages, rows)  # a skipped stage leaves the model as it was
    # the site's own bootstrap interval and standard error, carried like its metric
    for key, store in (("R_per_site_ci", runs.per_site_ci), ("R_per_site_se", runs.per_site_se)):
        store[site] = _carried(stages, results.get(key, {}).get(site, {}))
    runs.bytes_up[site] = 0  # nothing leaves the site
    runs.bytes_down[site] = 0
    runs.epsilon.update(results.get("epsilon", {}))
    runs.weights[site] = {m: count_test_cases(cases, s.input_keys) for m, s in modalities.items()}
    runs.rounds += round_records(registry, single["name"])


def _carried(stages: Sequence[str], by_stage: Mapping[str, Any]) -> list[Any]:
    """One row per stage: the stage's own, else the previous stage's (``{}`` before any)."""
    carried: list[Any] = []
    for stage in stages:
        carried.append(by_stage.get(stage, carried[-1] if carried else {}))
    return carried


def _pooled_row(runs: _LocalRuns, stage: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Stage ``stage``'s pooled row and its intervals over the sites."""
    columns = sorted({c for rows in runs.per_site.values() for c in rows[stage]})
    row = {}
    intervals: dict[str, list[float]] = {}
    for column in columns:
        value = case_weighted_mean(column, stage, runs.per_site, runs.weights)
        if value is not None:
            row[column] = value
            ci = pooled_ci(column, stage, runs.per_site, runs.per_site_se, runs.weights)
            if ci is not None:
                intervals[column] = ci
    return row, intervals


def case_weighted_mean(
    column: str,
    stage: int,
    per_site: Mapping[str, list[dict[str, float]]],
    weights: Mapping[str, Mapping[str, int]],
) -> float | None:
    """The sites' finite values of ``column`` at ``stage``, averaged weighted by test cases.

    A site's weight is its number of test cases with the inputs of the column's modality
    (``weights[site][modality]``). None when no site has a finite value or the weights sum
    to zero.
    """
    modality = column.split("@", 1)[1]
    pairs = [
        (rows[stage][column], weights[s].get(modality, 0))
        for s, rows in per_site.items()
        if column in rows[stage] and math.isfinite(rows[stage][column])
    ]
    if pairs and sum(w for _, w in pairs) > 0:
        return float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs]))
    return None


def pooled_ci(
    column: str,
    stage: int,
    per_site: Mapping[str, list[dict[str, float]]],
    per_site_se: Mapping[str, list[dict[str, Any]]],
    weights: Mapping[str, Mapping[str, int]],
) -> list[float] | None:
    """Interval of the ``local`` baseline's weighted mean from each site's own bootstrap se.

    None unless every contributing site recorded a standard error (see
    :func:`unicon_model.metrics.uncertainty.pooled_interval`).
    """
    modality = column.split("@", 1)[1]
    values, errors, cases = [], [], []
    for site, rows in per_site.items():
        value = rows[stage].get(column)
        if value is None or not math.isfinite(value) or weights[site].get(modality, 0) <= 0:
            continue
        se_rows = per_site_se.get(site, [])
        se = se_rows[stage].get(column) if stage < len(se_rows) else None
        values.append(value)
        errors.append(float(se) if isinstance(se, int | float) else math.nan)
        cases.append(weights[site].get(modality, 0))
    if not values:
        return None
    _, interval = pooled_interval(values, errors, cases)
    return [interval.lo, interval.hi] if math.isfinite(interval.se) else None
