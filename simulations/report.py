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
or integrated Brier score (survival). ``dice_prompted`` (same shape as ``R``, only when a
segmentation route takes box prompts) holds the case-weighted Dice with each case's label
box as its prompt, beside R's unprompted Dice. ``comparisons.intervals_disjoint`` marks,
per method and route, final intervals that do not overlap UNICON's.

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

The parts: :mod:`simulations.report_results` (:class:`MethodResult`, assembled from a
registry), :mod:`simulations.report_compare` (final values, comparisons between methods),
:mod:`simulations.report_plots` and :mod:`simulations.report_markdown`; their names stay
importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.report_compare import (
    CONTINUAL_BASELINES,
    best_baseline,
    comparisons,
    final_intervals,
    final_metrics,
    final_unseen,
    unseen_comparison,
    unseen_plot_data,
)
from simulations.report_markdown import DISJOINT_MARK, markdown_text, privacy_lines
from simulations.report_plots import (
    breakdown_plot,
    fairness_plot,
    heatmap_plot,
    methods_plot,
    reliability_plot,
    round_breakdown,
    rounds_plot,
    sites_plot,
    unseen_plot,
)
from simulations.report_plots import breakdown_plot as _breakdown_plot
from simulations.report_plots import stage_series as _stage_series
from simulations.report_plots import unseen_plot as _unseen_plot
from simulations.report_results import (
    AGGREGATION,
    MethodResult,
    continual_metrics,
    interval_matrix,
    kept_rounds,
    method_result,
    results_matrix,
)

__all__ = [
    "AGGREGATION",
    "CONTINUAL_BASELINES",
    "DISJOINT_MARK",
    "MethodResult",
    "_breakdown_plot",
    "_stage_series",
    "_unseen_plot",
    "best_baseline",
    "comparisons",
    "continual_metrics",
    "final_intervals",
    "final_metrics",
    "final_unseen",
    "interval_matrix",
    "kept_rounds",
    "method_result",
    "results_matrix",
    "round_breakdown",
    "unseen_comparison",
    "unseen_plot_data",
    "write_report",
]

logger = logging.getLogger(__name__)


def write_report(
    out: Path,
    plan_name: str,
    results: Mapping[str, MethodResult],
    notes: Sequence[str] = (),
    *,
    privacy: Mapping[str, Any] | None = None,
    served: Collection[str] = (),
) -> Path:
    """Write ``results.json``, ``report.md`` and the plots of the first method to ``out``.

    ``privacy`` (:func:`simulations.membership.privacy_report`) goes to ``results.json`` as
    ``privacy`` and to ``report.md`` as the section "Privacy in practice". ``served``: the
    plan's routes that another route serves (:func:`unicon_model.routes.served_routes`),
    given no PET gain in the comparisons.
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
        payload["comparisons"] = comparisons(results, served=served)
        methods_plot(results, out / "methods.png")
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    main = next(iter(results.values()))
    heatmap_plot(main, out / "R_heatmap.png")
    rounds_plot(main, out / "rounds.png")
    breakdown_plot(main, out / "rounds_breakdown.png")
    sites_plot(main, out / "sites.png")
    fairness_plot(main, out / "fairness.png")
    reliability_plot(main, out / "reliability.png")
    if main.holdout_sites:
        unseen_plot(main, out / "unseen.png")
    markdown = markdown_text(results, plan_name, notes, served)
    (out / "report.md").write_text(markdown + "\n".join([*privacy_lines(privacy), ""]))
    return out
