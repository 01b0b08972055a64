"""Pooling the sites' evaluation replies into per-site and case-weighted pooled metrics.

"Pooled" values are case-weighted means of the sites' own metrics, each computed by the site
over its own cases (a metric over the union of the cases would need every case's prediction
and label, which a site does not release). Intervals, fairness and calibration come from
the sites' aggregates only (:func:`unicon_model.metrics.evaluation.combine_sites`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.eligibility import split_bound
from server.round_checks import as_number
from server.sites import SiteLedger
from server.transport import Incoming
from unicon_model import protocol
from unicon_model.metrics.evaluation import combine_sites
from unicon_model.schema import PRIMARY_METRIC, TaskSpec

logger = logging.getLogger(__name__)

PROMPTED_METRIC = "dice_prompted"
"""A box-prompted segmentation route's Dice with each case's label box (``<route>/dice_prompted``),
pooled beside the route's primary metric (which stays the unprompted ``dice``, R's value)."""


@dataclass
class _SiteMetrics:
    """One site's evaluation reply, sorted: its row and the values that may be pooled."""

    row: dict[str, float] = field(default_factory=dict)
    """``task@modality`` -> the primary metric the site reported."""
    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    """``task@modality`` -> the site's metrics of that route, for routes that may be pooled."""
    weighted: list[tuple[str, float, float]] = field(default_factory=list)
    """(``task@modality``, primary metric, case count) of the routes that may be pooled."""
    primaries: dict[str, str] = field(default_factory=dict)
    """``task@modality`` -> the name of its primary metric."""


def _site_metrics(
    reply: Incoming, site: str, tasks: Mapping[str, TaskSpec], cases: int, split: str
) -> _SiteMetrics:
    """The primary metrics of ``tasks`` in one reply; a count above ``cases`` is not pooled."""
    out = _SiteMetrics()
    for key, value in reply.metrics.items():
        parsed = protocol.parse_metric_key(key)
        if parsed is None or parsed[0] not in tasks:
            continue
        task, modality, metric = parsed
        if metric != PRIMARY_METRIC[tasks[task].kind]:
            continue
        column = f"{task}@{modality}"
        out.row[column] = float(value)
        n = float(reply.metrics.get(protocol.metric_key(task, modality, "n"), 0.0))
        if not math.isfinite(n) or n > cases:
            logger.warning(
                "%s: %s count %r is not a finite number <= its %d %s case(s); its "
                "metric is left out of the pooled value",
                site,
                column,
                n,
                cases,
                split,
            )
        elif math.isfinite(value) and n > 0:
            out.weighted.append((column, float(value), n))
            prefix = f"{column}/"
            out.accepted[column] = {
                k.removeprefix(prefix): float(v)
                for k, v in reply.metrics.items()
                if k.startswith(prefix) and as_number(v) is not None
            }
            out.primaries[column] = metric
    return out


def _case_weighted(pairs: Mapping[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Route -> the mean of its ``(value, case count)`` pairs, weighted by the counts."""
    return {
        route: float(np.average([v for v, _ in vs], weights=[n for _, n in vs]))
        for route, vs in pairs.items()
    }


def pooled_extra(
    accepted: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str
) -> dict[str, float]:
    """Route -> case-weighted mean of the sites' ``metric``, over the routes that report it.

    Parameters
    ----------
    accepted
        Site -> ``task@modality`` -> metric name -> value, for the sites whose case count
        ``n`` was accepted (the sites pooled into R); a site without a finite ``metric`` or
        without cases is left out of that route's mean.
    metric
        The metric's name, e.g. :data:`PROMPTED_METRIC`.
    """
    pairs: dict[str, list[tuple[float, float]]] = {}
    for routes in accepted.values():
        for route, metrics in routes.items():
            value, n = metrics.get(metric), metrics.get("n", 0.0)
            if value is not None and math.isfinite(value) and math.isfinite(n) and n > 0:
                pairs.setdefault(route, []).append((float(value), float(n)))
    return _case_weighted(pairs)


def _unseen(
    holdout: set[str],
    rows: dict[str, dict[str, float]],
    accepted: dict[str, dict[str, dict[str, float]]],
    primaries: Mapping[str, str],
    split: str,
) -> dict[str, Any]:
    """The held-out sites' entry of an evaluation (``unseen``)."""
    silent = sorted(holdout - set(rows))
    if silent and split == "test":
        logger.warning("holdout site(s) %s reported no evaluation (not connected?)", silent)
    unseen = combine_sites(accepted, primaries)
    return {
        "sites": sorted(holdout),
        "per_site": rows,
        "pooled": unseen["pooled"],
        "pooled_ci": unseen["pooled_ci"],
        "per_site_ci": unseen["per_site_ci"],
        "per_site_n": {s: {c: m["n"] for c, m in r.items()} for s, r in accepted.items()},
    }


def pool_evaluation(
    replies: list[Incoming],
    malformed: Mapping[int, str],
    sites: Mapping[int, SiteLedger],
    tasks: Mapping[str, TaskSpec],
    split: str,
    holdout: set[str],
) -> dict[str, Any]:
    """Per-site and pooled primary metrics of ``tasks`` from the sites' evaluation replies.

    Error and malformed replies are left out. Sites in ``holdout`` are left out of every
    value and reported under ``unseen`` instead (only when ``holdout`` is not empty); see
    :meth:`server.coordinator.Coordinator.evaluate` for the keys. A box-prompted
    segmentation route adds ``dice_prompted`` (route -> the case-weighted mean of its sites'
    Dice with the label box, :func:`pooled_extra`), only when some site reported it.
    """
    per_site: dict[str, dict[str, float]] = {}
    sums: dict[str, list[tuple[float, float]]] = {}
    accepted: dict[str, dict[str, dict[str, float]]] = {}  # site -> route -> its metrics
    primaries: dict[str, str] = {}
    # held-out sites (never trained on) are scored apart and never enter the pooled values
    unseen_rows: dict[str, dict[str, float]] = {}
    unseen_accepted: dict[str, dict[str, dict[str, float]]] = {}
    for reply in replies:
        if not reply.ok or reply.node_id in malformed:
            continue
        site = sites[reply.node_id].site
        held_out = site in holdout
        cases = split_bound(sites[reply.node_id].capabilities, split)
        found = _site_metrics(reply, site, tasks, cases, split)
        for column, value, n in found.weighted:
            if not held_out:
                sums.setdefault(column, []).append((value, n))
        if found.accepted:
            (unseen_accepted if held_out else accepted).setdefault(site, {}).update(found.accepted)
        primaries.update(found.primaries)
        (unseen_rows if held_out else per_site)[site] = found.row
    pooled = _case_weighted(sums)
    combined = combine_sites(accepted, primaries)
    extra: dict[str, Any] = {}
    prompted = pooled_extra(accepted, PROMPTED_METRIC)
    if prompted:  # only when a box-prompted segmentation route reported it
        extra[PROMPTED_METRIC] = prompted
    if holdout:
        extra["unseen"] = _unseen(holdout, unseen_rows, unseen_accepted, primaries, split)
    return {
        "per_site": per_site,
        "pooled": pooled,
        "pooled_ci": combined["pooled_ci"],
        "per_site_ci": combined["per_site_ci"],
        "per_site_se": combined["per_site_se"],
        "per_site_n": {s: {c: m["n"] for c, m in r.items()} for s, r in accepted.items()},
        "fairness": combined["fairness"],
        "calibration": combined["calibration"],
        **extra,
    }


def validation_summary(evaluation: Mapping[str, Any], columns: set[str]) -> dict[str, Any]:
    """A ``val`` evaluation reduced to the stage's objective routes ``columns``.

    Returns
    -------
    dict
        ``per_site`` (site -> route -> primary metric), ``case_weighted_mean`` (route -> the
        pooled value) and ``score``: the mean of ``case_weighted_mean``, or ``None`` if no
        site reported any of ``columns``.
    """
    per_site = {
        site: {c: v for c, v in row.items() if c in columns}
        for site, row in evaluation["per_site"].items()
    }
    means = {c: v for c, v in evaluation["pooled"].items() if c in columns}
    score = float(np.mean(list(means.values()))) if means else None
    return {"per_site": per_site, "case_weighted_mean": means, "score": score}


def evaluation_lineage_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """What a version's lineage records of its test evaluation beyond the pooled values.

    ``worst/<route>`` and ``gap/<route>`` (the worst site's metric and best - worst, from
    ``fairness``) and, when the plan holds sites out, ``unseen/<route>`` (the held-out sites'
    case-weighted metric): what ``unicon model gate`` checks. Non-finite values are left out.
    """
    out: dict[str, float] = {}
    for route, entry in (evaluation.get("fairness") or {}).items():
        for name in ("worst", "gap"):
            value = as_number(entry.get(name)) if isinstance(entry, Mapping) else None
            if value is not None and math.isfinite(value):
                out[f"{name}/{route}"] = value
    for route, raw in ((evaluation.get("unseen") or {}).get("pooled") or {}).items():
        value = as_number(raw)
        if value is not None and math.isfinite(value):
            out[f"unseen/{route}"] = value
    return out
