"""What a site adds to each route's metrics, and how the coordinator combines the sites.

A site releases aggregate metrics only, never a per-case prediction, so everything the
report shows about uncertainty, fairness and calibration is computed at the site from its
own evaluated cases (:func:`classification_extras`, :func:`survival_extras`,
:func:`segmentation_extras`) and combined at the coordinator from the sites' numbers
(:func:`combine_sites`).

Extra metric names (each sent as ``<task>@<modality>/<name>``)
    ``<primary>_lo``, ``<primary>_hi``, ``<primary>_se``
        95 % percentile-bootstrap interval and bootstrap standard error of the primary
        metric (``accuracy``, ``cindex``, ``dice``), see :mod:`.uncertainty`.
    ``sensitivity``, ``specificity``, ``ece``, ``brier``
        Classification; see :mod:`.fairness` and :mod:`.calibration`.
    ``rel<k>_n``, ``rel<k>_conf``, ``rel<k>_acc``
        Classification reliability bin ``k`` (0-based, :data:`.calibration.DEFAULT_BINS`
        bins): count, mean confidence, accuracy.
    ``ibs``
        Survival integrated Brier score.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from unicon_model.metrics.calibration import (
    DEFAULT_BINS,
    ReliabilityBins,
    brier_score,
    integrated_brier_score,
    merge_bins,
    reliability_bins,
)
from unicon_model.metrics.fairness import sensitivity_specificity, site_spread
from unicon_model.metrics.uncertainty import (
    DEFAULT_REPLICATES,
    Interval,
    accuracy_interval,
    bootstrap_seed,
    cindex_interval,
    dice_interval,
    pooled_interval,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METRICS",
    "classification_extras",
    "combine_sites",
    "interval_metrics",
    "reliability_from_metrics",
    "segmentation_extras",
    "survival_extras",
]

CALIBRATION_METRICS = ("ece", "brier", "ibs")
"""Site calibration metrics combined as case-weighted means at the coordinator."""

CLASS_RATE_METRICS = ("sensitivity", "specificity")
"""Per-site classification rates kept next to the fairness figures."""

_RELIABILITY = re.compile(r"^rel(\d+)_(n|conf|acc)$")


def interval_metrics(primary: str, interval: Interval) -> dict[str, float]:
    """``{<primary>_lo, <primary>_hi, <primary>_se}`` of an interval."""
    return {
        f"{primary}_lo": interval.lo,
        f"{primary}_hi": interval.hi,
        f"{primary}_se": interval.se,
    }


def classification_extras(
    route: str,
    y_true: ArrayLike,
    probs: ArrayLike,
    *,
    replicates: int = DEFAULT_REPLICATES,
    bins: int = DEFAULT_BINS,
) -> dict[str, float]:
    """Accuracy interval, sensitivity/specificity, ECE, Brier and reliability bins.

    Parameters
    ----------
    route
        ``task@modality``: seeds the bootstrap (:func:`.uncertainty.bootstrap_seed`).
    y_true
        Labels, shape ``(n,)``.
    probs
        Class probabilities (softmax), shape ``(n, k)``.
    replicates, bins
        Bootstrap resamples and reliability bins.
    """
    truth = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    pred = p.argmax(axis=1)
    out = interval_metrics(
        "accuracy",
        accuracy_interval(truth, pred, seed=bootstrap_seed(route), replicates=replicates),
    )
    out["sensitivity"], out["specificity"] = sensitivity_specificity(
        truth, pred, num_classes=p.shape[1]
    )
    out["brier"] = brier_score(truth, p)
    reliability = reliability_bins(truth, p, bins=bins)
    out["ece"] = reliability.ece()
    for k, (n, conf, acc) in enumerate(
        zip(reliability.counts, reliability.confidence, reliability.accuracy, strict=True)
    ):
        out[f"rel{k}_n"] = float(n)
        out[f"rel{k}_conf"] = conf if n else 0.0
        out[f"rel{k}_acc"] = acc if n else 0.0
    return out


def survival_extras(
    route: str,
    time: ArrayLike,
    risk: ArrayLike,
    event: ArrayLike,
    *,
    replicates: int = DEFAULT_REPLICATES,
) -> dict[str, float]:
    """C-index interval and integrated Brier score (NaN where undefined)."""
    out = interval_metrics(
        "cindex",
        cindex_interval(time, risk, event, seed=bootstrap_seed(route), replicates=replicates),
    )
    try:
        out["ibs"] = integrated_brier_score(time, event, risk)
    except ValueError as e:
        logger.debug("%s: integrated Brier score undefined: %s", route, e)
        out["ibs"] = math.nan
    return out


def segmentation_extras(
    route: str, per_case: ArrayLike, *, replicates: int = DEFAULT_REPLICATES
) -> dict[str, float]:
    """Dice interval from per-case, per-label Dice scores."""
    return interval_metrics(
        "dice", dice_interval(per_case, seed=bootstrap_seed(route), replicates=replicates)
    )


def reliability_from_metrics(metrics: Mapping[str, float]) -> ReliabilityBins | None:
    """The reliability bins in one site's metrics of one route (``rel<k>_*``), or None.

    Bins with a missing, non-finite or negative value make the whole set None (a site that
    sent a malformed diagram is left out of the merged one).
    """
    found: dict[int, dict[str, float]] = {}
    for name, value in metrics.items():
        match = _RELIABILITY.match(name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = float(value)
    if not found or sorted(found) != list(range(len(found))):
        return None
    counts, conf, acc = [], [], []
    for k in range(len(found)):
        entry = found[k]
        if set(entry) != {"n", "conf", "acc"}:
            return None
        n, c, a = entry["n"], entry["conf"], entry["acc"]
        if not all(math.isfinite(x) for x in (n, c, a)) or n < 0 or n != round(n):
            return None
        counts.append(int(n))
        conf.append(c if n else math.nan)
        acc.append(a if n else math.nan)
    return ReliabilityBins(counts=counts, confidence=conf, accuracy=acc)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _route_site_values(
    site_metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    column: str,
    metric: str,
    per_site_ci: dict[str, dict[str, list[float]]],
    per_site_se: dict[str, dict[str, float]],
) -> tuple[dict[str, float], dict[str, float], list[float]]:
    """One route's primary value, case count and standard error of each usable site.

    Fills ``per_site_ci`` and ``per_site_se`` for the route as it goes. Returns the sites'
    values, their case counts and their standard errors (``nan`` where a site sent none).
    """
    values: dict[str, float] = {}
    cases: dict[str, float] = {}
    errors: list[float] = []
    for site, routes in site_metrics.items():
        row = routes.get(column)
        if row is None:
            continue
        value, n = _finite(row.get(metric)), _finite(row.get("n"))
        lo, hi = _finite(row.get(f"{metric}_lo")), _finite(row.get(f"{metric}_hi"))
        if lo is not None and hi is not None:
            per_site_ci.setdefault(site, {})[column] = [lo, hi]
        if value is None or n is None or n <= 0:
            continue
        values[site], cases[site] = value, n
        se = _finite(row.get(f"{metric}_se"))
        errors.append(math.nan if se is None else se)
        if se is not None:
            per_site_se.setdefault(site, {})[column] = se
    return values, cases, errors


def _fairness_entry(
    site_metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    column: str,
    values: Mapping[str, float],
    cases: Mapping[str, float],
) -> dict[str, Any] | None:
    """The site spread of one route, with ``per_site`` class rates where sites sent some."""
    spread = site_spread(values, cases)
    if spread is None:
        return None
    rates = {
        site: {
            name: site_metrics[site][column][name]
            for name in CLASS_RATE_METRICS
            if _finite(site_metrics[site][column].get(name)) is not None
        }
        for site in values
    }
    entry: dict[str, Any] = dict(spread)
    if any(rates.values()):
        entry["per_site"] = rates
    return entry


def _calibration_entry(
    site_metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    column: str,
    values: Mapping[str, float],
    cases: Mapping[str, float],
) -> dict[str, Any]:
    """Case-weighted calibration metrics of one route and its merged reliability diagram."""
    calibrated: dict[str, Any] = {}
    for name in CALIBRATION_METRICS:
        pairs = [
            (v, cases[s])
            for s in values
            if (v := _finite(site_metrics[s][column].get(name))) is not None
        ]
        if pairs:
            calibrated[name] = float(
                np.average([v for v, _ in pairs], weights=[n for _, n in pairs])
            )
    parts = [
        bins
        for s in values
        if (bins := reliability_from_metrics(site_metrics[s][column])) is not None
    ]
    if parts and len({len(p.counts) for p in parts}) == 1:
        merged = merge_bins(parts)
        calibrated["reliability"] = {
            "counts": merged.counts,
            "confidence": [None if math.isnan(c) else c for c in merged.confidence],
            "accuracy": [None if math.isnan(a) else a for a in merged.accuracy],
        }
        calibrated["ece_merged"] = merged.ece()
    return calibrated


def combine_sites(
    site_metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    primary: Mapping[str, str],
) -> dict[str, Any]:
    """Pooled values, intervals, fairness and calibration of every route from site metrics.

    Parameters
    ----------
    site_metrics
        Site -> ``task@modality`` -> metric name -> value, for the sites whose case count
        ``n`` was accepted (``n`` must be among the metrics).
    primary
        ``task@modality`` -> name of its primary metric.

    Returns
    -------
    dict
        ``pooled`` (route -> case-weighted mean), ``pooled_ci`` (route -> ``[lo, hi]``,
        :func:`.uncertainty.pooled_interval`, only where every contributing site sent a
        standard error), ``per_site_ci`` (site -> route -> ``[lo, hi]``), ``per_site_se``
        (site -> route -> bootstrap standard error), ``fairness``
        (route -> :func:`.fairness.site_spread` plus ``per_site`` sensitivity/specificity
        for classification), ``calibration`` (route -> case-weighted ``ece``/``brier``/``ibs``
        and, for classification, the merged ``reliability`` diagram).
    """
    pooled: dict[str, float] = {}
    pooled_ci: dict[str, list[float]] = {}
    per_site_ci: dict[str, dict[str, list[float]]] = {}
    per_site_se: dict[str, dict[str, float]] = {}
    fairness: dict[str, dict[str, Any]] = {}
    calibration: dict[str, dict[str, Any]] = {}
    for column, metric in primary.items():
        values, cases, errors = _route_site_values(
            site_metrics, column, metric, per_site_ci, per_site_se
        )
        if not values:
            continue
        mean, interval = pooled_interval(list(values.values()), errors, [cases[s] for s in values])
        pooled[column] = mean
        if math.isfinite(interval.se):
            pooled_ci[column] = [interval.lo, interval.hi]
        entry = _fairness_entry(site_metrics, column, values, cases)
        if entry is not None:
            fairness[column] = entry
        calibrated = _calibration_entry(site_metrics, column, values, cases)
        if calibrated:
            calibration[column] = calibrated
    return {
        "pooled": pooled,
        "pooled_ci": pooled_ci,
        "per_site_ci": per_site_ci,
        "per_site_se": per_site_se,
        "fairness": fairness,
        "calibration": calibration,
    }
