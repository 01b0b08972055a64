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

Plots: ``R_heatmap.png`` (R[stage, task]), ``rounds.png`` (per stage: training loss and
validation score per round, the kept round marked), ``sites.png`` (final metric per task
and site).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unicon_model.metrics.continual import summarise

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

        return clean(
            {
                "stages": self.stages,
                "tasks": self.tasks,
                "R": self.R,
                "R_per_site": self.R_per_site,
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
    acc, bwt, forgetting = continual_metrics(matrix)
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
    )


def final_metrics(result: MethodResult) -> dict[str, float]:
    """Each task's metric after the last stage (finite values only)."""
    if not result.R:
        return {}
    last = result.R[-1]
    return {t: float(v) for t, v in zip(result.tasks, last, strict=True) if math.isfinite(v)}


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
        alone from scratch with the same budget (``single-task``).
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = {name: final_metrics(r) for name, r in results.items()}
    tasks = sorted({t for f in finals.values() for t in f})
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(tasks), 3.8))
    width = 0.8 / max(len(finals), 1)
    for i, (name, final) in enumerate(finals.items()):
        xs = [j + i * width for j, t in enumerate(tasks) if t in final]
        ax.bar(xs, [final[t] for t in tasks if t in final], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("final test metric\n(case-weighted mean of sites)")
    ax.set_title("methods side by side")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(result: MethodResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(result.R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(result.tasks), 1.2 + 0.6 * len(result.stages)))
    image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(result.tasks)), result.tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(result.stages)), [f"after {s}" for s in result.stages])
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="w")
    ax.set_title(f"R[stage, task] ({result.name}, test, case-weighted mean of sites)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
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
    plt.close(fig)


def _sites(result: MethodResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted(result.R_per_site)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(result.tasks), 3.5))
    width = 0.8 / max(len(sites), 1)
    for k, site in enumerate(sites):
        final = np.array(result.R_per_site[site][-1] if result.stages else [], dtype=float)
        ax.bar(np.arange(len(result.tasks)) + k * width, np.nan_to_num(final), width, label=site)
    ax.set_xticks(
        np.arange(len(result.tasks)) + 0.4 - width / 2, result.tasks, rotation=30, ha="right"
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("final test metric")
    ax.set_title("final metric per task and site (missing: site lacks the task/modality)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return (
        "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    )


def _markdown(results: Mapping[str, MethodResult], plan_name: str, notes: Sequence[str]) -> str:
    lines = [f"# Simulation report: plan `{plan_name}`", ""]
    lines += [f"- {note}" for note in notes]
    lines.append(f"- R and validation scores: {AGGREGATION}")
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
        for name, result in results.items():
            final = final_metrics(result)
            lines.append(f"| {name} | " + " | ".join(_fmt(final.get(t)) for t in tasks) + " |")
        extra = comparisons(results)
        lines.append("")
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
        lines += ["", "![methods](methods.png)"]
    for name, result in results.items():
        lines += ["", f"## {name}: R[stage, task] (case-weighted mean of site metrics, test)", ""]
        lines.append("| after stage | " + " | ".join(result.tasks) + " |")
        lines.append("|---|" + "---|" * len(result.tasks))
        for stage, row in zip(result.stages, result.R, strict=True):
            lines.append(f"| {stage} | " + " | ".join(_fmt(v) for v in row) + " |")
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
        "![sites](sites.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out: Path, plan_name: str, results: Mapping[str, MethodResult], notes: Sequence[str] = ()
) -> Path:
    """Write ``results.json``, ``report.md`` and the plots of the first method to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "plan": plan_name,
        "R_aggregation": AGGREGATION,
        "methods": {n: r.to_json() for n, r in results.items()},
    }
    if len(results) > 1:
        payload["comparisons"] = comparisons(results)
        _methods_plot(results, out / "methods.png")
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    main = next(iter(results.values()))
    _heatmap(main, out / "R_heatmap.png")
    _rounds(main, out / "rounds.png")
    _sites(main, out / "sites.png")
    (out / "report.md").write_text(_markdown(results, plan_name, notes))
    return out
