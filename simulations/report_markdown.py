"""The text of ``report.md``: summary, comparison, per-method and privacy tables."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from simulations.report_compare import (
    comparisons,
    final_intervals,
    final_metrics,
    final_unseen,
    unseen_comparison,
)
from simulations.report_results import AGGREGATION, MethodResult

logger = logging.getLogger(__name__)


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


def _prompted_lines(result: MethodResult) -> list[str]:
    """Per box-prompted segmentation route and stage: Dice without a box (R) and with one."""
    rows = []
    for stage, r_row, prompted in zip(result.stages, result.R, result.dice_prompted, strict=False):
        for task, dice, boxed in zip(result.tasks, r_row, prompted, strict=True):
            if math.isfinite(boxed):
                gain = f"{boxed - dice:+.3f}" if math.isfinite(dice) else "–"
                rows.append(f"| {stage} | {task} | {_fmt(dice)} | {_fmt(boxed)} | {gain} |")
    if not rows:
        return []
    return [
        "",
        f"### {result.name}: box prompts (case-weighted mean of site metrics, test)",
        "",
        "| after stage | task@modality | Dice, no box (R) | Dice, label box | box − no box |",
        "|---|---|---|---|---|",
        *rows,
    ]


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


def markdown_text(
    results: Mapping[str, MethodResult],
    plan_name: str,
    notes: Sequence[str],
    served: Collection[str] = (),
) -> str:
    """The text of ``report.md`` before its privacy section.

    Parameters
    ----------
    results
        Method name -> its results, the main method (UNICON) first.
    plan_name
        The plan's name, in the title.
    notes
        Lines of the bullet list under the title.
    served
        The plan's routes that another route serves (:func:`comparisons`).
    """
    lines = _summary_lines(results, plan_name, notes)
    if len(results) > 1:
        lines += _comparison_lines(results, served)
    for name, result in results.items():
        lines += _method_lines(name, result)
    return "\n".join(lines + _figure_lines(results))


def _summary_lines(
    results: Mapping[str, MethodResult], plan_name: str, notes: Sequence[str]
) -> list[str]:
    """Title, notes, how R is pooled and the ACC / BWT / forgetting table of every method."""
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
    return lines


def _comparison_lines(results: Mapping[str, MethodResult], served: Collection[str]) -> list[str]:
    """Methods side by side: final metric per task, the comparisons, the unseen hospital."""
    tasks = sorted({t for r in results.values() for t in r.tasks})
    lines = ["", "## Final metric per task (case-weighted mean of site metrics, test)", ""]
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("|---|" + "---|" * len(tasks))
    extra = comparisons(results, served=served)
    disjoint = extra.get("intervals_disjoint", {})
    for name, result in results.items():
        final, intervals = final_metrics(result), final_intervals(result)
        marks = disjoint.get(name, {})
        cells = [
            _cell(final.get(t), intervals.get(t)) + (f" {DISJOINT_MARK}" if marks.get(t) else "")
            for t in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _comparison_notes(extra, disjoint)
    lines += _unseen_final_lines(results, tasks)
    return [*lines, "", "![methods](methods.png)"]


def _comparison_notes(extra: Mapping[str, Any], disjoint: Mapping[str, Any]) -> list[str]:
    """The bullet list under the final-metric table (:func:`comparisons`' figures)."""
    lines = []
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
        lines.append(f"- what the new images add to {task}: {gain['mean']:+.3f} (mean over sites)")
    return lines


def _unseen_final_lines(results: Mapping[str, MethodResult], tasks: Sequence[str]) -> list[str]:
    """Final unseen-site metric per task and method (empty when no site is held out)."""
    held = [r for r in results.values() if r.holdout_sites]
    if not held:
        return []
    lines = [
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
    return lines


def _method_lines(name: str, result: MethodResult) -> list[str]:
    """One method's R table, fairness, unseen hospital, calibration and bytes per site."""
    lines = ["", f"## {name}: R[stage, task] (case-weighted mean of site metrics, test)", ""]
    lines.append("| after stage | " + " | ".join(result.tasks) + " |")
    lines.append("|---|" + "---|" * len(result.tasks))
    for i, (stage, row) in enumerate(zip(result.stages, result.R, strict=True)):
        cis = result.R_ci[i] if i < len(result.R_ci) else []
        cells = [_cell(v, cis[j] if j < len(cis) else None) for j, v in enumerate(row)]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += _prompted_lines(result)
    lines += _fairness_lines(result)
    lines += _unseen_lines(result)
    lines += _calibration_lines(result)
    lines += ["", "| site | bytes up | bytes down | ε |", "|---|---|---|---|"]
    for site in sorted(result.bytes_up):
        lines.append(
            f"| {site} | {result.bytes_up[site]:,} | {result.bytes_down.get(site, 0):,} | "
            f"{result.epsilon.get(site, 0.0):.3g} |"
        )
    return lines


def _figure_lines(results: Mapping[str, MethodResult]) -> list[str]:
    """The plots of the main (first) method, as markdown images."""
    lines = [
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
    return lines


def privacy_lines(privacy: Mapping[str, Any] | None) -> list[str]:
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
