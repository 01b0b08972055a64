"""Figures read off :class:`~simulations.report_results.MethodResult`: final values and comparisons.

The final metric, interval and unseen-site value of each ``task@modality`` after the last
stage, the in-federation vs unseen-site rows, and the side-by-side figures between the
methods of one run (:func:`comparisons`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from simulations.report_results import MethodResult
from unicon_model.metrics.uncertainty import intervals_overlap

logger = logging.getLogger(__name__)


def unseen_comparison(result: MethodResult) -> list[dict[str, Any]]:
    """In-federation vs unseen-site metric for every stage and route the held-out sites scored.

    Returns
    -------
    list of dict
        ``stage``, ``task``, ``federation`` and ``federation_ci`` (R and R_ci), ``unseen``
        and ``unseen_ci``, ``drop`` (``federation - unseen``); one per stage and route with a
        finite unseen value, in stage then column order. Empty without holdout sites.
    """
    out: list[dict[str, Any]] = []
    for i, stage in enumerate(result.stages):
        row = result.unseen[i] if i < len(result.unseen) else []
        for j, task in enumerate(result.tasks):
            value = row[j] if j < len(row) else math.nan
            if not math.isfinite(value):
                continue
            federation = result.R[i][j] if i < len(result.R) else math.nan
            ci = result.R_ci[i][j] if i < len(result.R_ci) and j < len(result.R_ci[i]) else None
            unseen_ci = (
                result.unseen_ci[i][j]
                if i < len(result.unseen_ci) and j < len(result.unseen_ci[i])
                else None
            )
            out.append(
                {
                    "stage": stage,
                    "task": task,
                    "federation": federation,
                    "federation_ci": ci,
                    "unseen": value,
                    "unseen_ci": unseen_ci,
                    "drop": federation - value if math.isfinite(federation) else math.nan,
                }
            )
    return out


def unseen_plot_data(result: MethodResult) -> list[dict[str, Any]]:
    """What ``unseen.png`` shows: the last stage's rows of :func:`unseen_comparison`.

    Returns
    -------
    list of dict
        One per route the held-out sites scored after the last stage, in column order:
        ``task``, ``federation`` and ``federation_ci`` (the in-federation case-weighted mean
        and its 95 % interval, None without one), ``unseen`` and ``unseen_ci``, ``drop``.
        Empty without holdout sites or when they reported nothing after the last stage.
    """
    if not result.holdout_sites or not result.stages:
        return []
    last = result.stages[-1]
    return [
        {k: v for k, v in row.items() if k != "stage"}
        for row in unseen_comparison(result)
        if row["stage"] == last
    ]


def final_intervals(result: MethodResult) -> dict[str, list[float]]:
    """Each task's 95 % interval after the last stage (where one was recorded)."""
    if not result.R_ci or not result.R:
        return {}
    last = result.R_ci[-1]
    return {t: ci for t, ci in zip(result.tasks, last, strict=False) if ci is not None}


def final_unseen(result: MethodResult) -> dict[str, tuple[float, list[float] | None]]:
    """Each task's unseen-site metric after the last stage and its interval (finite only)."""
    if not result.unseen:
        return {}
    last = result.unseen[-1]
    intervals = result.unseen_ci[-1] if result.unseen_ci else []
    return {
        t: (float(v), intervals[j] if j < len(intervals) else None)
        for j, (t, v) in enumerate(zip(result.tasks, last, strict=False))
        if math.isfinite(v)
    }


def final_metrics(result: MethodResult) -> dict[str, float]:
    """Each task's metric after the last stage (finite values only)."""
    if not result.R:
        return {}
    last = result.R[-1]
    return {t: float(v) for t, v in zip(result.tasks, last, strict=True) if math.isfinite(v)}


CONTINUAL_BASELINES = ("naive", "ewc", "lwf", "single-task")
"""The methods a task added by a later stage must match or beat (issue targets)."""


def best_baseline(
    final: Mapping[str, float], results: Mapping[str, MethodResult]
) -> dict[str, dict[str, Any]]:
    """Per task@modality of ``final``: UNICON minus the best continual-learning baseline.

    Returns
    -------
    dict
        ``{column: {"method": best baseline, "value": its final metric, "difference":
        UNICON's final metric minus it}}`` over the :data:`CONTINUAL_BASELINES` present in
        ``results`` that report the column (none present: empty).
    """
    out: dict[str, dict[str, Any]] = {}
    finals = {n: final_metrics(results[n]) for n in CONTINUAL_BASELINES if n in results}
    for column, value in final.items():
        scored = [
            (f[column], n) for n, f in finals.items() if math.isfinite(f.get(column, math.nan))
        ]
        if not scored or not math.isfinite(value):
            continue
        top, name = max(scored)
        out[column] = {"method": name, "value": top, "difference": value - top}
    return out


def comparisons(
    results: Mapping[str, MethodResult], *, served: Collection[str] = ()
) -> dict[str, Any]:
    """Side-by-side figures between methods of one run.

    ``served``: the plan's routes that another route serves (no PET gain for them).

    Returns
    -------
    dict
        ``federated_over_centralised``: per task, UNICON's final metric / the centralised
        baseline's; ``bwt_unicon_minus_naive``; ``pet_gain``: per task and site, the final
        metric of a route with the new images minus its ``-ablation`` route without them
        (``no-pet`` baseline), at the sites that have both, and their mean;
        ``unicon_over_unet``: per segmentation task@modality, UNICON's final metric / the
        centrally trained ``unet`` reference's; ``unicon_minus_single_task``: per task@modality
        added after the first stage, UNICON's final metric minus that of the same task trained
        alone from scratch with the same budget (``single-task``); ``intervals_disjoint``: per
        other method and task, whether its final 95 % interval and UNICON's do not overlap
        (only where both have one); ``analytic_seg_minus_best_baseline``: as
        ``unicon_minus_best_baseline`` for UNICON's variant with analytic segmentation heads
        (``analytic-seg``, a run of its own), when it ran.
    """
    out: dict[str, Any] = {}
    unicon = results.get("unicon")
    if unicon is None:
        return out
    final = final_metrics(unicon)
    central = results.get("centralised")
    if central is not None:
        reference = final_metrics(central)
        out["federated_over_centralised"] = {
            t: final[t] / reference[t] for t in final if reference.get(t)
        }
    unet = results.get("unet")
    if unet is not None:
        reference = final_metrics(unet)
        out["unicon_over_unet"] = {t: final[t] / reference[t] for t in final if reference.get(t)}
    single = results.get("single-task")
    if single is not None:
        alone = final_metrics(single)
        out["unicon_minus_single_task"] = {t: final[t] - alone[t] for t in final if t in alone}
    best = best_baseline(final, results)
    if best:
        out["unicon_minus_best_baseline"] = best
    analytic = results.get("analytic-seg")
    if analytic is not None:
        best = best_baseline(final_metrics(analytic), results)
        if best:
            out["analytic_seg_minus_best_baseline"] = best
    disjoint = intervals_disjoint(unicon, results)
    if disjoint:
        out["intervals_disjoint"] = disjoint
    naive = results.get("naive")
    if naive is not None:
        out["bwt_unicon_minus_naive"] = unicon.bwt - naive.bwt
    ablation = results.get("no-pet")
    if ablation is not None:
        out["pet_gain"] = pet_gain(unicon, ablation, served)
    return out


def intervals_disjoint(
    unicon: MethodResult, results: Mapping[str, MethodResult]
) -> dict[str, dict[str, bool]]:
    """Per other method and task: whether its final 95 % interval and UNICON's do not overlap.

    Only tasks where both have an interval; methods with none of them are left out.
    """
    mine = final_intervals(unicon)
    disjoint: dict[str, dict[str, bool]] = {}
    for name, method in results.items():
        if name == "unicon":
            continue
        theirs = final_intervals(method)
        for task in sorted(set(mine) & set(theirs)):
            overlap = intervals_overlap(mine[task], theirs[task])
            if overlap is not None:
                disjoint.setdefault(name, {})[task] = not overlap
    return disjoint


def pet_gain(
    unicon: MethodResult, ablation: MethodResult, served: Collection[str] = ()
) -> dict[str, dict[str, Any]]:
    """Per task: each site's final metric with the new images minus its ``-ablation`` route's.

    Columns in ``served`` (routes no stage trains, which another route serves:
    :func:`unicon_model.routes.served_routes`) are left out: they do not read the new images.

    Returns
    -------
    dict
        ``{column: {"per_site": {site: gain}, "mean": mean over those sites}}`` for the
        columns of ``unicon`` whose ``-ablation`` twin ``ablation`` (the ``no-pet``
        baseline) reports, at the sites where both final values are finite.
    """
    gains: dict[str, dict[str, float]] = {}
    for j, column in enumerate(unicon.tasks):
        twin = f"{column}-ablation"
        if twin not in ablation.tasks or column in served:
            continue
        k = ablation.tasks.index(twin)
        for site, rows in unicon.R_per_site.items():
            other = ablation.R_per_site.get(site)
            if not rows or not other:
                continue
            with_images, without = rows[-1][j], other[-1][k]
            if math.isfinite(with_images) and math.isfinite(without):
                gains.setdefault(column, {})[site] = with_images - without
    return {
        column: {"per_site": per_site, "mean": float(np.mean(list(per_site.values())))}
        for column, per_site in gains.items()
    }
