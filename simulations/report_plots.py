"""The PNG plots of a simulation report (see :mod:`simulations.report` for what each shows)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulations.report_compare import final_intervals, final_metrics, unseen_plot_data
from simulations.report_results import MethodResult, kept_rounds

logger = logging.getLogger(__name__)


def methods_plot(results: Mapping[str, MethodResult], path: Path) -> None:
    """``methods.png``: every method's final metric per task, with 95 % error bars."""
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


def heatmap_plot(result: MethodResult, path: Path) -> None:
    """``R_heatmap.png``: R[stage, task] with its 95 % intervals."""
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


def stage_series(
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


def rounds_plot(result: MethodResult, path: Path) -> None:
    """``rounds.png``: per stage, training loss and validation score per round (kept round ★)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 3.8))
    loss_ax, val_ax = fig.subplots(1, 2)
    for ax in (loss_ax, val_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kept = kept_rounds(result.rounds)
    for stage in result.stages:
        xs, ys = stage_series(result.rounds, stage, "loss")
        if not xs:
            continue
        (line,) = loss_ax.plot(xs, ys, "o-", label=stage)
        vx, vy = stage_series(result.rounds, stage, "val_score")
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


def breakdown_plot(result: MethodResult, path: Path) -> None:
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


def sites_plot(result: MethodResult, path: Path) -> None:
    """``sites.png``: final metric per task and site, with 95 % error bars."""
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


def fairness_plot(result: MethodResult, path: Path) -> None:
    """``fairness.png``: per route the site metrics and intervals, worst site marked, and
    the case-weighted mean with its interval."""
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


def unseen_plot(result: MethodResult, path: Path) -> None:
    """``unseen.png``: per route after the last stage, in-federation vs unseen hospital
    (:func:`~simulations.report_compare.unseen_plot_data`)."""
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


def reliability_plot(result: MethodResult, path: Path) -> None:
    """``reliability.png``: per classification route, accuracy against confidence per bin
    (sites merged) and the bin counts."""
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
