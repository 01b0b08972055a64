"""Fairness across sites: how the metric of one route varies between hospitals.

Per ``task@modality`` route, from each site's metric and evaluated case count
(:func:`site_spread`):

* ``worst_site`` / ``worst`` - the lowest site metric (every primary metric is
  higher-is-better: accuracy, C-index, Dice), and ``best_site`` / ``best``;
* ``gap`` - ``best - worst``;
* ``sd`` - the case-weighted standard deviation across sites,
  ``sqrt(sum_i w_i (m_i - mean)^2)`` with ``w_i = n_i / sum n`` and ``mean`` the
  case-weighted mean (the pooled value);
* ``sites`` - the number of sites with a finite metric.

For classification, :func:`sensitivity_specificity` gives each site's sensitivity and
specificity (binary: the positive class is class 1, the second class; more classes: the
macro mean of the one-vs-rest values).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

logger = logging.getLogger(__name__)

__all__ = ["sensitivity_specificity", "site_spread"]


def site_spread(
    values: Mapping[str, float], cases: Mapping[str, float]
) -> dict[str, float | str | int] | None:
    """Worst site, best site, gap and case-weighted SD of one route's site metrics.

    Parameters
    ----------
    values
        Site name -> metric; non-finite values are left out.
    cases
        Site name -> evaluated case count (the weight); a site without a positive count is
        left out of the SD and mean but still counts for worst and best.

    Returns
    -------
    dict or None
        ``worst_site``, ``worst``, ``best_site``, ``best``, ``gap``, ``mean``, ``sd``,
        ``sites``; ``None`` when no site has a finite metric. ``sd`` and ``mean`` are NaN
        when no site has a positive case count.
    """
    finite = {s: float(v) for s, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return None
    worst_site = min(sorted(finite), key=lambda s: finite[s])
    best_site = max(sorted(finite), key=lambda s: finite[s])
    weighted = {s: float(cases.get(s, 0.0) or 0.0) for s in finite}
    weighted = {s: n for s, n in weighted.items() if math.isfinite(n) and n > 0}
    if weighted:
        weights = np.array(list(weighted.values())) / sum(weighted.values())
        metric = np.array([finite[s] for s in weighted])
        mean = float(np.dot(weights, metric))
        sd = float(np.sqrt(np.dot(weights, (metric - mean) ** 2)))
    else:
        mean = sd = math.nan
    return {
        "worst_site": worst_site,
        "worst": finite[worst_site],
        "best_site": best_site,
        "best": finite[best_site],
        "gap": finite[best_site] - finite[worst_site],
        "mean": mean,
        "sd": sd,
        "sites": len(finite),
    }


def sensitivity_specificity(
    y_true: ArrayLike, y_pred: ArrayLike, *, num_classes: int | None = None
) -> tuple[float, float]:
    """Sensitivity (true positive rate) and specificity (true negative rate).

    Parameters
    ----------
    y_true, y_pred
        True and predicted integer labels, shape ``(n,)``.
    num_classes
        Number of classes (default: ``max label + 1``, at least 2).

    Returns
    -------
    tuple
        Binary: ``(TP / (TP + FN), TN / (TN + FP))`` with class 1 positive. More classes: the
        unweighted means over classes of the one-vs-rest values, leaving out a class whose
        value is undefined. NaN when undefined (no positive case, or no negative case).
    """
    truth = np.asarray(y_true).astype(np.int64).ravel()
    pred = np.asarray(y_pred).astype(np.int64).ravel()
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true has {truth.shape[0]} samples but y_pred has {pred.shape[0]}: "
            "pass one prediction per sample"
        )
    k = num_classes or max(2, int(max(truth.max(initial=0), pred.max(initial=0))) + 1)
    classes = [1] if k == 2 else list(range(k))
    sens, spec = [], []
    for c in classes:
        positive, called = truth == c, pred == c
        p, n = int(positive.sum()), int((~positive).sum())
        sens.append(float((positive & called).sum() / p) if p else math.nan)
        spec.append(float((~positive & ~called).sum() / n) if n else math.nan)

    def mean(values: list[float]) -> float:
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    return mean(sens), mean(spec)
