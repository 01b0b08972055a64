"""The report of a simulation run: results.json, report.md and PNG plots.

``results.json`` has ``R_aggregation`` (what every "pooled" value is, see below) and, per
method under ``methods.<name>``: ``stages``, ``tasks`` (columns ``task@modality``), the test
matrix ``R`` (stages x tasks, ``null`` before a task is learned), ``R_per_site``, ``acc``,
``bwt``, ``forgetting``, ``bytes_up``/``bytes_down`` and ``epsilon`` per site, ``wall_s``,
the per-round ``rounds`` records (training ``loss``; ``val`` with the validated metrics per
site and their case-weighted means, ``val_score`` and ``best_round``) and ``kept_rounds``
(stage -> the round whose model was committed, as the coordinator's lineage records it).

``R`` and the validation scores are the **case-weighted mean of site metrics**: each site
computes the metric over its own cases and the values are averaged weighted by the sites'
case counts. That is not the metric over the pooled cases (Dice and C-index are not
additive): computing that would need each case's prediction and label at the coordinator,
which the sites do not release, since a per-case prediction or label is patient data.

Uncertainty, fairness and calibration (all from the sites' aggregates, see
:mod:`unicon_model.metrics.evaluation`): ``R_ci`` (same shape as ``R``, each entry
``[lo, hi]`` or ``null``) and ``R_per_site_ci`` hold 95 % intervals (``R_ci_method`` says
how they are computed); ``fairness`` holds, per ``task@modality`` after the last stage, the
worst site and its metric, the best - worst gap, the case-weighted SD across sites and, for
classification, each site's sensitivity and specificity; ``calibration`` holds per route
the case-weighted ECE and Brier score (classification, with the merged reliability diagram)
or integrated Brier score (survival). ``comparisons.intervals_disjoint`` marks, per method
and route, final intervals that do not overlap UNICON's.

Plots: ``R_heatmap.png`` (R[stage, task] with its intervals), ``rounds.png`` (per stage:
training loss and validation score per round, the kept round marked), ``sites.png`` (final
metric per task and site, with error bars), ``fairness.png`` (per route the site metrics
with intervals, the worst site marked, the case-weighted mean and its interval),
``reliability.png`` (per classification route: accuracy against confidence per bin, and
the bin counts), ``methods.png`` with ``--compare`` (final metrics with error bars),
``unseen.png`` with a held-out site (per route after the last stage: the in-federation value
next to the unseen hospital's, both with intervals; :func:`unseen_plot_data`).

An unseen hospital (``unicon simulate --holdout-site NAME``): the method's ``unseen`` holds
``sites`` (the held-out sites, never trained on), ``R`` and ``R_ci`` (same shape as the
method's ``R``: the held-out sites' case-weighted test metric after every stage) and
``R_per_site``; the report prints them next to the in-federation values. It is absent when
no site is held out.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unicon_model.metrics.continual import summarise
from unicon_model.metrics.fairness import site_spread
from unicon_model.metrics.uncertainty import intervals_overlap

logger = logging.getLogger(__name__)

AGGREGATION = (
    "case-weighted mean of site metrics: each site computes the metric over its own cases and "
    "the values are averaged weighted by the sites' case counts; not a metric over the pooled "
    "cases, which would need per-case predictions and labels that the sites do not release"
)
"""What R and the validation scores are (``R_aggregation`` in ``results.json``)."""


@dataclass(frozen=True)
class MethodResult:
    """One method's results over a plan's stages."""

    name: str
    stages: list[str]
    tasks: list[str]
    R: list[list[float]]
    R_per_site: dict[str, list[list[float]]]
    acc: float
    bwt: float
    forgetting: float
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    epsilon: dict[str, float]
    wall_s: float
    rounds: list[dict[str, Any]]
    R_ci: list[list[list[float] | None]] = field(default_factory=list)
    R_per_site_ci: dict[str, list[list[list[float] | None]]] = field(default_factory=dict)
    fairness: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    ci_method: str = ""
    holdout_sites: list[str] = field(default_factory=list)
    unseen: list[list[float]] = field(default_factory=list)
    unseen_ci: list[list[list[float] | None]] = field(default_factory=list)
    unseen_per_site: dict[str, list[list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (NaN as ``null``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return None if math.isnan(value) else value
            if isinstance(value, list):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        unseen = (
            {
                "unseen": {
                    "sites": self.holdout_sites,
                    "R": self.unseen,
                    "R_ci": self.unseen_ci,
                    "R_per_site": self.unseen_per_site,
                }
            }
            if self.holdout_sites
            else {}
        )
        return clean(
            {
                **unseen,
                "stages": self.stages,
                "tasks": self.tasks,
                "R": self.R,
                "R_per_site": self.R_per_site,
                "R_ci": self.R_ci,
                "R_per_site_ci": self.R_per_site_ci,
                "R_ci_method": self.ci_method,
                "fairness": self.fairness,
                "calibration": self.calibration,
                "acc": self.acc,
                "bwt": self.bwt,
                "forgetting": self.forgetting,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "epsilon": self.epsilon,
                "wall_s": self.wall_s,
                "rounds": self.rounds,
                "kept_rounds": kept_rounds(self.rounds),
            }
        )


def kept_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Stage -> the round whose model was committed: the best-validated round, else the last.

    Read from the round records (``best_round`` of the stage's last record, which is what
    the coordinator commits with ``keep_best``; without validation, the last round).
    """
    kept: dict[str, int] = {}
    for record in rounds:
        stage, round_ = record.get("stage"), record.get("round")
        if isinstance(stage, str) and isinstance(round_, int):
            best = record.get("best_round")
            keep = record.get("keep_best", True) is not False
            kept[stage] = best if keep and isinstance(best, int) else round_
    return kept


def results_matrix(
    stages: Sequence[str], rows: Sequence[Mapping[str, float]]
) -> tuple[list[str], np.ndarray]:
    """Columns in order of first appearance and the stages x columns matrix (NaN if absent)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    matrix = np.full((len(stages), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            value = row.get(column)
            if value is not None and math.isfinite(value):
                matrix[i, j] = value
    return columns, matrix


def continual_metrics(matrix: np.ndarray) -> tuple[float, float, float]:
    """ACC, BWT and average forgetting, each task introduced where its column starts."""
    if matrix.size == 0:
        return math.nan, math.nan, math.nan
    introduced = []
    for j in range(matrix.shape[1]):
        finite = np.flatnonzero(np.isfinite(matrix[:, j]))
        introduced.append(int(finite[0]) if finite.size else matrix.shape[0])
    # a column that disappears later (site gone) is carried forward as missing: fill with the
    # last value so the metrics stay defined; such gaps are reported in the matrix as null
    filled = matrix.copy()
    for j, start in enumerate(introduced):
        for i in range(start + 1, matrix.shape[0]):
            if not np.isfinite(filled[i, j]):
                filled[i, j] = filled[i - 1, j]
    summary = summarise(filled, introduced)
    return summary.acc, summary.bwt, summary.forgetting


def method_result(
    name: str, registry_results: Mapping[str, Any], rounds: list[dict[str, Any]], wall_s: float
) -> MethodResult:
    """Assemble a method's results from a registry's ``results.json`` and round records."""
    stages = list(registry_results.get("stages", []))
    tasks, matrix = results_matrix(stages, registry_results.get("R", []))
    per_site: dict[str, list[list[float]]] = {}
    for site, by_stage in registry_results.get("R_per_site", {}).items():
        site_rows = [by_stage.get(stage, {}) for stage in stages]
        aligned = np.full((len(stages), len(tasks)), np.nan)
        site_columns, site_values = results_matrix(stages, site_rows)
        for j, column in enumerate(site_columns):
            aligned[:, tasks.index(column)] = site_values[:, j]
        per_site[site] = aligned.tolist()
    per_site_ci = {
        site: interval_matrix(tasks, [by_stage.get(stage, {}) for stage in stages])
        for site, by_stage in registry_results.get("R_per_site_ci", {}).items()
    }
    acc, bwt, forgetting = continual_metrics(matrix)
    holdout = [str(s) for s in registry_results.get("holdout_sites") or []]
    unseen_rows = _rows(registry_results.get("unseen"), len(stages)) if holdout else []
    unseen_per_site = {
        site: _aligned(tasks, [by_stage.get(stage, {}) for stage in stages])
        for site, by_stage in (registry_results.get("unseen_per_site") or {}).items()
        if holdout
    }
    return MethodResult(
        name=name,
        stages=stages,
        tasks=tasks,
        R=matrix.tolist(),
        R_per_site=per_site,
        acc=acc,
        bwt=bwt,
        forgetting=forgetting,
        bytes_up=dict(registry_results.get("bytes_up", {})),
        bytes_down=dict(registry_results.get("bytes_down", {})),
        epsilon=dict(registry_results.get("epsilon", {})),
        wall_s=wall_s,
        rounds=rounds,
        R_ci=interval_matrix(tasks, _rows(registry_results.get("R_ci"), len(stages))),
        R_per_site_ci=per_site_ci,
        fairness=_final_fairness(registry_results, stages, per_site),
        calibration=dict(_last(registry_results.get("calibration"), len(stages))),
        ci_method=str(registry_results.get("R_ci_method", "")),
        holdout_sites=holdout,
        unseen=_aligned(tasks, unseen_rows) if holdout else [],
        unseen_ci=interval_matrix(tasks, _rows(registry_results.get("unseen_ci"), len(stages)))
        if holdout
        else [],
        unseen_per_site=unseen_per_site,
    )


def _aligned(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Stages x ``tasks`` matrix of the rows' values (NaN where absent or not finite)."""
    out = []
    for row in rows:
        values = []
        for task in tasks:
            value = row.get(task) if isinstance(row, Mapping) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.append(float(value) if math.isfinite(value) else math.nan)
            else:
                values.append(math.nan)
        out.append(values)
    return out


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


def _rows(rows: Any, stages: int) -> list[Mapping[str, Any]]:
    """``rows`` (one dict per stage) padded or cut to ``stages`` entries."""
    rows = [r if isinstance(r, Mapping) else {} for r in (rows or [])][:stages]
    return rows + [{}] * (stages - len(rows))


def _last(rows: Any, stages: int) -> Mapping[str, Any]:
    """The row of the last stage in a per-stage list (empty if absent)."""
    padded = _rows(rows, stages)
    return padded[-1] if padded else {}


def _interval(value: Any) -> list[float] | None:
    """``[lo, hi]`` if ``value`` is a pair of finite numbers with ``lo <= hi``, else None."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    lo, hi = value
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    if not numbers or not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        return None
    return [float(lo), float(hi)]


def interval_matrix(
    tasks: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> list[list[list[float] | None]]:
    """Stages x ``tasks`` matrix of ``[lo, hi]`` intervals (None where absent or invalid)."""
    return [[_interval(row.get(task)) for task in tasks] for row in rows]


def _final_fairness(
    registry_results: Mapping[str, Any], stages: Sequence[str], per_site: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Fairness after the last stage: the coordinator's record, else from ``R_per_site``.

    A baseline assembled without the coordinator's fairness record (``local``,
    ``single-task``, ``unet``) gets the worst site, best site and gap from its per-site
    final metrics; without per-site case counts its weighted SD is NaN.
    """
    recorded = _last(registry_results.get("fairness"), len(stages))
    if recorded:
        return {c: dict(v) for c, v in recorded.items() if isinstance(v, Mapping)}
    if not stages:
        return {}
    tasks, _ = results_matrix(stages, registry_results.get("R", []))
    counts = registry_results.get("R_per_site_n", {})
    out: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(tasks):
        values = {site: rows[-1][j] for site, rows in per_site.items() if rows}
        cases = {
            site: float(counts.get(site, {}).get(stages[-1], {}).get(task, 0.0) or 0.0)
            for site in values
        }
        spread = site_spread(values, cases)
        if spread is not None:
            out[task] = spread
    return out


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


def comparisons(results: Mapping[str, MethodResult]) -> dict[str, Any]:
    """Side-by-side figures between methods of one run.

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
        (only where both have one).
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
    if disjoint:
        out["intervals_disjoint"] = disjoint
    naive = results.get("naive")
    if naive is not None:
        out["bwt_unicon_minus_naive"] = unicon.bwt - naive.bwt
    ablation = results.get("no-pet")
    if ablation is not None:
        gains: dict[str, dict[str, float]] = {}
        for j, column in enumerate(unicon.tasks):
            twin = f"{column}-ablation"
            if twin not in ablation.tasks:
                continue
            k = ablation.tasks.index(twin)
            for site, rows in unicon.R_per_site.items():
                other = ablation.R_per_site.get(site)
                if not rows or not other:
                    continue
                with_images, without = rows[-1][j], other[-1][k]
                if math.isfinite(with_images) and math.isfinite(without):
                    gains.setdefault(column, {})[site] = with_images - without
        out["pet_gain"] = {
            column: {"per_site": per_site, "mean": float(np.mean(list(per_site.values())))}
            for column, per_site in gains.items()
        }
    return out


def _methods_plot(results: Mapping[str, MethodResult], path: Path) -> None:
    from matplotlib.figure import Figure

    finals = {name: final_metrics(r) for name, r in results.items()}
    tasks = sorted({t for f in finals.values() for t in f})
    fig = Figure(figsize=(1.6 + 1.3 * len(tasks), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(len(finals), 1)
    for i, (name, final) in enumerate(finals.items()):
        shown = [t for t in tasks if t in final]
        xs = [tasks.index(t) + i * width for t in shown]
        ax.bar(xs, [final[t] for t in shown], width, label=name)
        _error_bars(ax, xs, [final[t] for t in shown], final_intervals(results[name]), shown)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("final test metric\n(case-weighted mean of sites)")
    ax.set_title("methods side by side (bars: 95% intervals)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _heatmap(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure

    matrix = np.array(result.R, dtype=float)
    fig = Figure(figsize=(1.4 + 1.1 * len(result.tasks), 1.2 + 0.6 * len(result.stages)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(result.stages)), [f"after {s}" for s in result.stages])
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ci = result.R_ci[i][j] if i < len(result.R_ci) else None
                text = f"{matrix[i, j]:.2f}" + (f"\n[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                ax.text(j, i, text, ha="center", va="center", color="w", fontsize="small")
    ax.set_title(f"R[stage, task] ({result.name}, test, case-weighted mean of sites)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _stage_series(
    rounds: Sequence[Mapping[str, Any]], stage: str, key: str
) -> tuple[list[int], list[float]]:
    """Rounds and finite values of ``key`` for one stage (a resumed round's last record)."""
    by_round: dict[int, float] = {}
    for record in rounds:
        value = record.get(key)
        if record.get("stage") != stage or not isinstance(record.get("round"), int):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            by_round[record["round"]] = float(value)
    xs = sorted(by_round)
    return xs, [by_round[x] for x in xs]


def _rounds(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.8))
    loss_ax, val_ax = fig.subplots(1, 2)
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kept = kept_rounds(result.rounds)
    for stage in result.stages:
        xs, ys = _stage_series(result.rounds, stage, "loss")
        if not xs:
            continue
        (line,) = loss_ax.plot(xs, ys, "o-", label=stage)
        vx, vy = _stage_series(result.rounds, stage, "val_score")
        if vx:
            val_ax.plot(vx, vy, "o-", color=line.get_color(), label=stage)
            if kept.get(stage) in vx:
                k = kept[stage]
                val_ax.plot([k], [vy[vx.index(k)]], "*", ms=14, color=line.get_color())
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("training loss (example-weighted)")
    loss_ax.set_title("training loss per stage")
    loss_ax.legend(fontsize="small")
    val_ax.set_xlabel("round")
    val_ax.set_ylabel("validation score\n(case-weighted mean of sites)")
    val_ax.set_title("validation score per stage (★ kept round)")
    if val_ax.lines:
        val_ax.legend(fontsize="small")
    else:
        val_ax.text(0.5, 0.5, "no validation reported", ha="center", transform=val_ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def round_breakdown(rounds: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Stage -> mean seconds per round of each phase, adding up to the mean round wall time.

    The coordinator's own phases are kept; its waits for the sites (``train_wait``,
    ``evaluate_wait``) are split into the sites' phases (``site <phase>``, summed over the
    sites) and ``messaging`` (the rest of the wait). When the sites worked in parallel (their
    sum exceeds the wait) each site phase gets its share of the wait. Rounds without a
    ``timing`` record (older registries) are skipped.
    """
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for record in rounds:
        timing = record.get("timing")
        if not isinstance(timing, Mapping):
            continue
        stage = str(record.get("stage", "?"))
        row = sums.setdefault(stage, {})
        counts[stage] = counts.get(stage, 0) + 1
        coordinator = dict(timing.get("coordinator", {}))
        wait = sum(coordinator.pop(k, 0.0) for k in ("train_wait_s", "evaluate_wait_s"))
        site_phases: dict[str, float] = {}
        for phases in timing.get("sites", {}).values():
            for name, value in phases.items():
                site_phases[name] = site_phases.get(name, 0.0) + float(value)
        total = sum(site_phases.values())
        share = min(1.0, wait / total) if total > 0 else 0.0
        for name, value in coordinator.items():
            key = name.removesuffix("_s")
            row[key] = row.get(key, 0.0) + float(value)
        for name, value in site_phases.items():
            key = f"site {name.removesuffix('_s')}"
            row[key] = row.get(key, 0.0) + value * share
        row["messaging"] = row.get("messaging", 0.0) + max(wait - total, 0.0)
    return {stage: {k: v / counts[stage] for k, v in row.items()} for stage, row in sums.items()}


def _breakdown_plot(result: MethodResult, path: Path) -> None:
    """``rounds_breakdown.png``: one stacked bar per stage, mean seconds per round by phase."""
    import matplotlib
    from matplotlib.figure import Figure

    breakdown = round_breakdown(result.rounds)
    fig = Figure(figsize=(max(6.0, 1.4 * len(breakdown) + 3), 4.2))
    ax = fig.subplots()
    if not breakdown:
        ax.text(0.5, 0.5, "no round timing recorded", ha="center", transform=ax.transAxes)
    phases = sorted({p for row in breakdown.values() for p in row})
    stages = list(breakdown)
    bottom = np.zeros(len(stages))
    colours = matplotlib.colormaps["tab20"]
    for i, phase in enumerate(phases):
        values = np.array([breakdown[s].get(phase, 0.0) for s in stages])
        ax.bar(stages, values, bottom=bottom, label=phase, color=colours(i % 20))
        bottom += values
    ax.set_ylabel("seconds per round (mean)")
    ax.set_title("where a round's time goes, per stage")
    if phases:
        ax.legend(fontsize="x-small", bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _sites(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure

    sites = sorted(result.R_per_site)
    fig = Figure(figsize=(1.5 + 1.2 * len(result.tasks), 3.5))
    ax = fig.subplots()
    width = 0.8 / max(len(sites), 1)
    for k, site in enumerate(sites):
        final = np.array(result.R_per_site[site][-1] if result.stages else [], dtype=float)
        xs = np.arange(len(result.tasks)) + k * width
        ax.bar(xs, np.nan_to_num(final), width, label=site)
        rows = result.R_per_site_ci.get(site, [])
        last = rows[-1] if rows else []
        intervals = {t: ci for t, ci in zip(result.tasks, last, strict=False) if ci}
        _error_bars(ax, list(xs), list(final), intervals, result.tasks)
    ax.set_xticks(
        np.arange(len(result.tasks)) + 0.4 - width / 2, result.tasks, rotation=30, ha="right"
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("final test metric")
    ax.set_title("final metric per task and site, 95% intervals (missing: site lacks it)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _error_bars(
    ax: Any,
    xs: Sequence[float],
    values: Sequence[float],
    intervals: Mapping[str, Sequence[float]],
    tasks: Sequence[str],
) -> None:
    """Draw ``[lo, hi]`` error bars at ``xs`` for the tasks that have an interval."""
    points = [
        (x, v, intervals[t])
        for x, v, t in zip(xs, values, tasks, strict=True)
        if t in intervals and math.isfinite(v)
    ]
    if not points:
        return
    x, v, ci = zip(*points, strict=True)
    lower = [max(0.0, value - c[0]) for value, c in zip(v, ci, strict=True)]
    upper = [max(0.0, c[1] - value) for value, c in zip(v, ci, strict=True)]
    ax.errorbar(x, v, yerr=[lower, upper], fmt="none", ecolor="black", capsize=3, lw=1)


def _fairness_plot(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure

    tasks = [t for t in result.tasks if t in result.fairness]
    fig = Figure(figsize=(1.8 + 1.4 * max(len(tasks), 1), 3.8))
    ax = fig.subplots()
    pooled = final_metrics(result)
    pooled_ci = final_intervals(result)
    sites = sorted(result.R_per_site)
    for j, task in enumerate(tasks):
        k = result.tasks.index(task)
        worst = result.fairness[task].get("worst_site")
        for i, site in enumerate(sites):
            rows = result.R_per_site[site]
            value = rows[-1][k] if rows else math.nan
            if not math.isfinite(value):
                continue
            x = j - 0.3 + 0.6 * (i + 0.5) / max(len(sites), 1)
            ci_rows = result.R_per_site_ci.get(site, [])
            ci = ci_rows[-1][k] if ci_rows else None
            colour = "tab:red" if site == worst else "tab:blue"
            ax.plot([x], [value], "o", color=colour)
            if ci:
                ax.plot([x, x], ci, "-", color=colour, lw=1)
            ax.annotate(site, (x, value), fontsize="x-small", rotation=90, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        if task in pooled:
            ax.hlines(pooled[task], j - 0.35, j + 0.35, colors="black", lw=2)
        if task in pooled_ci:
            lo, hi = pooled_ci[task]
            ax.fill_between([j - 0.35, j + 0.35], lo, hi, color="grey", alpha=0.25)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_xlim(-0.6, max(len(tasks), 1) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("final test metric")
    ax.set_title(
        f"fairness across sites ({result.name})\n"
        "sites with 95% intervals (worst red); black: weighted mean, grey: its interval",
        fontsize="small",
    )
    if not tasks:
        ax.text(0.5, 0.5, "no per-site metrics", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _unseen_plot(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure

    rows = unseen_plot_data(result)
    fig = Figure(figsize=(2.4 + 1.4 * max(len(rows), 2), 4.0))
    ax = fig.subplots()
    series = (("federation", "in-federation", "tab:blue", -0.15),
              ("unseen", "unseen hospital", "tab:orange", 0.15))  # fmt: skip
    for key, label, colour, offset in series:
        points = [(j + offset, row[key], row[f"{key}_ci"]) for j, row in enumerate(rows)]
        points = [p for p in points if math.isfinite(p[1])]
        if not points:
            continue
        xs, values, intervals = zip(*points, strict=True)
        ax.plot(xs, values, "o", color=colour, label=label)
        for x, ci in zip(xs, intervals, strict=True):
            if ci:
                ax.plot([x, x], ci, "-", color=colour, lw=1.5)
    ax.set_xticks(range(len(rows)), [row["task"] for row in rows], rotation=30, ha="right")
    ax.set_xlim(-0.6, max(len(rows), 1) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"test metric after {result.stages[-1] if result.stages else '–'}")
    ax.set_title(
        f"in-federation vs unseen hospital {', '.join(result.holdout_sites)} ({result.name})\n"
        "case-weighted means with 95% intervals\n(routes it has no cases for: left out)",
        fontsize="small",
    )
    if rows:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "the held-out site reported no test metric", ha="center",
                transform=ax.transAxes)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _reliability_plot(result: MethodResult, path: Path) -> None:
    from matplotlib.figure import Figure

    diagrams = {
        task: entry["reliability"]
        for task, entry in result.calibration.items()
        if isinstance(entry, Mapping) and isinstance(entry.get("reliability"), Mapping)
    }
    columns = max(len(diagrams), 1)
    fig = Figure(figsize=(3.4 * columns, 5.2))
    axes = fig.subplots(2, columns, squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for j, (task, diagram) in enumerate(diagrams.items()):
        top, bottom = axes[0][j], axes[1][j]
        counts = list(diagram.get("counts", []))
        bins = len(counts)
        centres = (np.arange(bins) + 0.5) / max(bins, 1)
        conf = np.array([np.nan if c is None else c for c in diagram.get("confidence", [])])
        acc = np.array([np.nan if a is None else a for a in diagram.get("accuracy", [])])
        top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
        shown = np.isfinite(conf) & np.isfinite(acc)
        top.plot(conf[shown], acc[shown], "o-", label="sites merged")
        ece = result.calibration[task].get("ece_merged")
        title = task if not isinstance(ece, float) else f"{task}\nECE {ece:.3f}"
        top.set_title(title, fontsize="small")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.legend(fontsize="x-small")
        bottom.bar(centres, counts, width=1.0 / max(bins, 1), edgecolor="black")
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (top-label probability)")
        bottom.set_ylabel("cases")
    if not diagrams:
        axes[0][0].text(0.5, 0.5, "no classification route", ha="center",
                        transform=axes[0][0].transAxes)  # fmt: skip
    fig.suptitle(f"reliability ({result.name}, test, bins summed over sites)", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _fmt(value: float | None) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def _cell(value: float | None, interval: Sequence[float] | None) -> str:
    """``0.710 [0.620, 0.800]`` (the value alone when it has no interval)."""
    text = _fmt(value)
    if interval is None or text == "–":
        return text
    return f"{text} [{interval[0]:.3f}, {interval[1]:.3f}]"


DISJOINT_MARK = "†"
"""Marks a method's final metric whose 95 % interval does not overlap UNICON's."""


def _fairness_lines(result: MethodResult) -> list[str]:
    if not result.fairness:
        return []
    lines = [
        "",
        f"### {result.name}: fairness across sites (after the last stage, test)",
        "",
        "| task@modality | worst site | worst | best − worst | case-weighted SD | sites |",
        "|---|---|---|---|---|---|",
    ]
    rates: list[str] = []
    for task, entry in result.fairness.items():
        lines.append(
            f"| {task} | {entry.get('worst_site', '–')} | {_fmt(entry.get('worst'))} | "
            f"{_fmt(entry.get('gap'))} | {_fmt(entry.get('sd'))} | {entry.get('sites', '–')} |"
        )
        for site, values in sorted((entry.get("per_site") or {}).items()):
            rates.append(
                f"| {task} | {site} | {_fmt(values.get('sensitivity'))} | "
                f"{_fmt(values.get('specificity'))} |"
            )
    if rates:
        lines += ["", "| task@modality | site | sensitivity | specificity |", "|---|---|---|---|"]
        lines += rates
    return lines


def _unseen_lines(result: MethodResult) -> list[str]:
    rows = unseen_comparison(result)
    if not result.holdout_sites:
        return []
    held = ", ".join(result.holdout_sites)
    lines = [
        "",
        f"### {result.name}: in-federation vs unseen hospital ({held}, never trained on; test)",
        "",
    ]
    if not rows:
        return [*lines, f"- the held-out site(s) {held} reported no test metric"]
    lines += [
        "| after stage | task@modality | in-federation | unseen site | in-federation − unseen |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        drop = row["drop"]
        lines.append(
            f"| {row['stage']} | {row['task']} | {_cell(row['federation'], row['federation_ci'])} "
            f"| {_cell(row['unseen'], row['unseen_ci'])} | "
            f"{'–' if not math.isfinite(drop) else f'{drop:+.3f}'} |"
        )
    return lines


def _calibration_lines(result: MethodResult) -> list[str]:
    rows = []
    final = final_metrics(result)
    for task, entry in result.calibration.items():
        if not isinstance(entry, Mapping):
            continue
        rows.append(
            f"| {task} | {_fmt(final.get(task))} | {_fmt(entry.get('ece'))} | "
            f"{_fmt(entry.get('ece_merged'))} | {_fmt(entry.get('brier'))} | "
            f"{_fmt(entry.get('ibs'))} |"
        )
    if not rows:
        return []
    return [
        "",
        f"### {result.name}: calibration (after the last stage, test)",
        "",
        "| task@modality | R metric | ECE (mean of sites) | ECE (bins merged) | Brier | "
        "integrated Brier |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def _markdown(results: Mapping[str, MethodResult], plan_name: str, notes: Sequence[str]) -> str:
    lines = [f"# Simulation report: plan `{plan_name}`", ""]
    lines += [f"- {note}" for note in notes]
    lines.append(f"- R and validation scores: {AGGREGATION}")
    method = next((r.ci_method for r in results.values() if r.ci_method), "")
    if method:
        lines.append(f"- Intervals `[lo, hi]`: {method}")
    lines.append("")
    lines.append("| method | ACC | BWT | forgetting | wall s | bytes up (all sites) |")
    lines.append("|---|---|---|---|---|---|")
    for name, result in results.items():
        lines.append(
            f"| {name} | {_fmt(result.acc)} | {_fmt(result.bwt)} | {_fmt(result.forgetting)} | "
            f"{result.wall_s:.1f} | {sum(result.bytes_up.values()):,} |"
        )
    if len(results) > 1:
        tasks = sorted({t for r in results.values() for t in r.tasks})
        lines += ["", "## Final metric per task (case-weighted mean of site metrics, test)", ""]
        lines.append("| method | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---|" * len(tasks))
        extra = comparisons(results)
        disjoint = extra.get("intervals_disjoint", {})
        for name, result in results.items():
            final, intervals = final_metrics(result), final_intervals(result)
            marks = disjoint.get(name, {})
            cells = [
                _cell(final.get(t), intervals.get(t))
                + (f" {DISJOINT_MARK}" if marks.get(t) else "")
                for t in tasks
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        if disjoint:
            lines.append(
                f"- {DISJOINT_MARK}: the method's 95% interval does not overlap UNICON's. "
                "Overlapping intervals do not prove equality, and this is not a paired test: "
                "a paired bootstrap of the difference needs both methods' per-case predictions, "
                "which the sites do not release."
            )
        for task, ratio in extra.get("federated_over_centralised", {}).items():
            lines.append(f"- federated / centralised, {task}: {ratio:.3f}")
        for task, ratio in extra.get("unicon_over_unet", {}).items():
            lines.append(f"- UNICON / centralised unet, {task}: {ratio:.3f}")
        for task, gain in extra.get("unicon_minus_single_task", {}).items():
            lines.append(f"- UNICON minus single-task, {task}: {gain:+.3f}")
        if "bwt_unicon_minus_naive" in extra:
            lines.append(f"- BWT of UNICON minus naive: {extra['bwt_unicon_minus_naive']:+.3f}")
        for task, gain in extra.get("pet_gain", {}).items():
            lines.append(
                f"- what the new images add to {task}: {gain['mean']:+.3f} (mean over sites)"
            )
        held = [r for r in results.values() if r.holdout_sites]
        if held:
            lines += [
                "",
                "## Unseen hospital: final metric per task "
                f"({', '.join(held[0].holdout_sites)}, never trained on; test)",
                "",
                "| method | " + " | ".join(tasks) + " |",
                "|---|" + "---|" * len(tasks),
            ]
            for name, result in results.items():
                unseen = final_unseen(result)
                cells = [_cell(*unseen[t]) if t in unseen else "–" for t in tasks]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append(
                "- a method without a value did not evaluate the held-out site (`local`, "
                "`single-task` and `unet` are not scored there)"
            )
        lines += ["", "![methods](methods.png)"]
    for name, result in results.items():
        lines += ["", f"## {name}: R[stage, task] (case-weighted mean of site metrics, test)", ""]
        lines.append("| after stage | " + " | ".join(result.tasks) + " |")
        lines.append("|---|" + "---|" * len(result.tasks))
        for i, (stage, row) in enumerate(zip(result.stages, result.R, strict=True)):
            cis = result.R_ci[i] if i < len(result.R_ci) else []
            cells = [_cell(v, cis[j] if j < len(cis) else None) for j, v in enumerate(row)]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines += _fairness_lines(result)
        lines += _unseen_lines(result)
        lines += _calibration_lines(result)
        lines += ["", "| site | bytes up | bytes down | ε |", "|---|---|---|---|"]
        for site in sorted(result.bytes_up):
            lines.append(
                f"| {site} | {result.bytes_up[site]:,} | {result.bytes_down.get(site, 0):,} | "
                f"{result.epsilon.get(site, 0.0):.3g} |"
            )
    lines += [
        "",
        "![R heatmap](R_heatmap.png)",
        "",
        "![rounds](rounds.png)",
        "",
        "![where the time of a round goes, per stage](rounds_breakdown.png)",
        "",
        "![sites](sites.png)",
        "",
        "![fairness](fairness.png)",
        "",
        "![reliability](reliability.png)",
        "",
    ]
    if next(iter(results.values())).holdout_sites:
        lines += ["![unseen hospital](unseen.png)", ""]
    return "\n".join(lines)


def _privacy_lines(privacy: Mapping[str, Any] | None) -> list[str]:
    """The "Privacy in practice" section: the attack per route and what left each site."""
    if not privacy:
        return []
    dp = ", ".join(f"{k} (ε {v['target_epsilon']:g})" for k, v in (privacy.get("dp") or {}).items())
    lines = ["", "## Privacy in practice", ""]
    lines.append(
        f"- ε spent (max over sites): {privacy.get('max_epsilon', 0.0):.3g}; "
        f"DP stages: {dp or 'none (ε = ∞)'}"
    )
    mia = privacy.get("mia")
    if mia:
        lines += [
            f"- Attack: {privacy.get('mia_method', '')}; {privacy.get('survival_proxy', '')}",
            f"- Intervals: {privacy.get('mia_ci_method', '')}; model {privacy.get('mia_version')}",
            "",
            "| task@modality | target ε | MIA AUC [95% CI] | members / non-members | per site |",
            "|---|---|---|---|---|",
        ]
        for route, entry in mia.items():
            target = entry.get("epsilon_target")
            per_site = ", ".join(
                f"{site} {_fmt(v.get('auc'))}" for site, v in sorted(entry["per_site"].items())
            )
            lines.append(
                f"| {route} | {'∞' if target is None else f'{target:g}'} | "
                f"{_cell(entry.get('mia_auc'), entry.get('mia_auc_ci'))} | "
                f"{entry.get('members', 0)} / {entry.get('nonmembers', 0)} | {per_site or '–'} |"
            )
    elif privacy.get("mia_error"):
        lines.append(f"- Membership-inference attack failed: {privacy['mia_error']}")
    elif "mia" in privacy:
        lines.append("- Membership-inference attack: not run (`--no-mia`)")
    lines += [
        "",
        "| site | bytes up | bytes down | rounds sent | what left the site (stage: components) |",
        "|---|---|---|---|---|",
    ]
    for site, entry in (privacy.get("data_left_sites") or {}).items():
        sent = "; ".join(
            f"{stage}: {', '.join(v['components'])} ({v['form']}, {v['rounds']} round(s))"
            for stage, v in entry["stages"].items()
        )
        lines.append(
            f"| {site} | {entry['bytes_up']:,} | {entry['bytes_down']:,} | {entry['rounds']} | "
            f"{sent or 'nothing'} |"
        )
    lines += ["", "Besides these, each evaluation sends aggregate metrics only."]
    return lines


def write_report(
    out: Path,
    plan_name: str,
    results: Mapping[str, MethodResult],
    notes: Sequence[str] = (),
    *,
    privacy: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results.json``, ``report.md`` and the plots of the first method to ``out``.

    ``privacy`` (:func:`simulations.membership.privacy_report`) goes to ``results.json`` as
    ``privacy`` and to ``report.md`` as the section "Privacy in practice".
    """
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "plan": plan_name,
        "R_aggregation": AGGREGATION,
        "methods": {n: r.to_json() for n, r in results.items()},
    }
    if privacy is not None:
        payload["privacy"] = privacy
    if len(results) > 1:
        payload["comparisons"] = comparisons(results)
        _methods_plot(results, out / "methods.png")
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    main = next(iter(results.values()))
    _heatmap(main, out / "R_heatmap.png")
    _rounds(main, out / "rounds.png")
    _breakdown_plot(main, out / "rounds_breakdown.png")
    _sites(main, out / "sites.png")
    _fairness_plot(main, out / "fairness.png")
    _reliability_plot(main, out / "reliability.png")
    if main.holdout_sites:
        _unseen_plot(main, out / "unseen.png")
    markdown = _markdown(results, plan_name, notes)
    (out / "report.md").write_text(markdown + "\n".join([*_privacy_lines(privacy), ""]))
    return out
