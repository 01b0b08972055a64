"""Repeated runs of UNICON and the continual-learning baselines under other training seeds.

One run per method compares single draws: on the quick scenario a method's final Dice moves
by ±0.02–0.03 between runs that differ only in their training seed (the plan's name seeds
every site's batching and initialisation), as much as the differences being measured. The
learning benchmark therefore repeats UNICON and each baseline of
:data:`simulations.report_compare.CONTINUAL_BASELINES` under ``repeats - 1`` more plan names
(``<plan>-seed2``, ``<plan>-seed3``, …) on the same sites, and reports, per task@modality,
each method's mean and standard deviation over the runs and UNICON minus the baseline with
the best mean: the difference of the means with a Welch 95 % interval
(:func:`repeat_summary`). The first run of every method is the benchmark's own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from simulations.bench_pool import MethodJob

if TYPE_CHECKING:
    from simulations.report import MethodResult

__all__ = [
    "REPEAT_METHODS",
    "repeat_jobs",
    "repeat_summary",
    "repeated_finals",
    "welch_interval",
]

REPEAT_METHODS = ("unicon", "naive", "ewc", "lwf", "single-task")
"""The methods repeated: UNICON and the baselines a later task must match or beat."""


def welch_interval(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``a`` minus mean of ``b`` and its Welch 95 % interval.

    Returns
    -------
    tuple
        ``(difference, low, high)``; the interval is ``(nan, nan)`` when either sample has
        fewer than two values or both have no spread.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    difference = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return difference, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se2 = vx + vy
    if se2 == 0:
        return difference, math.nan, math.nan
    dof = se2**2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.975, dof)) * math.sqrt(se2)
    return difference, difference - half, difference + half


def repeat_summary(
    finals: Mapping[str, Sequence[Mapping[str, float]]], columns: Sequence[str]
) -> dict[str, Any]:
    """Means, spreads and UNICON minus the best baseline over repeated runs.

    Parameters
    ----------
    finals
        Per method (``unicon`` and baselines), one mapping per run from task@modality to
        its final metric (columns a run does not report, or reports as NaN, are skipped).
    columns
        The task@modality columns to compare (:func:`simulations.bench_learning.bench_learning`
        passes every column of UNICON's final row).

    Returns
    -------
    dict
        ``runs``: the number of runs per method; ``mean`` / ``sd``: per method and column;
        ``unicon_minus_best_baseline``: per column, ``{"method", "difference", "low",
        "high", "unicon", "baseline"}`` with the baseline of the best mean, the difference of
        the means and its Welch 95 % interval, and both methods' per-run values.
    """
    values: dict[str, dict[str, list[float]]] = {
        method: {
            column: [float(r[column]) for r in runs if math.isfinite(r.get(column, math.nan))]
            for column in columns
        }
        for method, runs in finals.items()
    }
    summary: dict[str, Any] = {
        "runs": {method: len(runs) for method, runs in finals.items()},
        "mean": {
            m: {c: float(np.mean(v)) for c, v in cols.items() if v} for m, cols in values.items()
        },
        "sd": {
            m: {c: float(np.std(v, ddof=1)) for c, v in cols.items() if len(v) > 1}
            for m, cols in values.items()
        },
    }
    best: dict[str, Any] = {}
    ours = values.get("unicon", {})
    for column in columns:
        if not ours.get(column):
            continue
        scored = [
            (float(np.mean(cols[column])), method)
            for method, cols in values.items()
            if method != "unicon" and cols.get(column)
        ]
        if not scored:
            continue
        _, method = max(scored)
        difference, low, high = welch_interval(ours[column], values[method][column])
        best[column] = {
            "method": method,
            "difference": difference,
            "low": low,
            "high": high,
            "unicon": ours[column],
            "baseline": values[method][column],
        }
    summary["unicon_minus_best_baseline"] = best
    return summary


def _repeat_key(method: str, run: int) -> str:
    """The result key of ``method``'s run ``run`` ≥ 2."""
    return f"{method}#seed{run}"


def repeat_jobs(
    raw: Mapping[str, Any],
    sites: Sequence[Path],
    work: Path,
    methods: Sequence[str],
    *,
    repeats: int,
) -> list[MethodJob]:
    """Runs 2 … ``repeats`` of each of ``methods``: the plan renamed ``<name>-seed<k>`` (a new
    training seed, the same sites) under ``work/seed<k>``, keyed ``<method>#seed<k>``."""
    jobs = []
    for k in range(2, repeats + 1):
        renamed = copy.deepcopy(dict(raw))
        renamed["name"] = f"{raw['name']}-seed{k}"
        for method in methods:
            jobs.append(
                MethodJob(_repeat_key(method, k), method, renamed, work / f"seed{k}", tuple(sites))
            )
    return jobs


def repeated_finals(
    first: Mapping[str, MethodResult], results: Mapping[str, MethodResult], *, repeats: int
) -> dict[str, list[dict[str, float]]]:
    """Final metrics of every :data:`REPEAT_METHODS` method in ``first`` over its runs.

    Run 1 is ``first[method]`` (the benchmark's own), run ``k`` ≥ 2 ``results`` under the key
    ``<method>#seed<k>`` (:func:`repeat_jobs`).
    """
    from simulations.report_compare import final_metrics

    return {
        method: [
            final_metrics(first[method]),
            *(final_metrics(results[_repeat_key(method, k)]) for k in range(2, repeats + 1)),
        ]
        for method in REPEAT_METHODS
        if method in first
    }


def difference_figure(best: Mapping[str, Any]) -> str:
    """The table figure of one column of ``repeat_summary``'s ``unicon_minus_best_baseline``:
    the difference, its interval (or why there is none) and the baseline of the best mean."""
    interval = (
        f"[{best['low']:+.3f}, {best['high']:+.3f}]"
        if math.isfinite(best["low"])
        else "(no interval: no spread over the runs)"
    )
    return f"{best['difference']:+.3f} {interval} (best mean: {best['method']})"
