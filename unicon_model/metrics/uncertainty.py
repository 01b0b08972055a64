"""Bootstrap confidence intervals of the primary metrics, computed where the cases are.

Threat model: a site releases aggregate metrics only, never a per-case prediction. So each
site bootstraps its own evaluated cases and sends the interval bounds and the bootstrap
standard error next to the metric; the coordinator combines the sites' standard errors into
an interval of the case-weighted mean (:func:`pooled_interval`).

Per-site interval (:func:`bootstrap_interval`)
    Percentile bootstrap: ``B`` resamples of the ``n`` cases with replacement
    (:data:`DEFAULT_REPLICATES` = 200), the metric recomputed on each, the 2.5 % and 97.5 %
    percentiles of the replicates as the 95 % interval and their standard deviation
    (``ddof=1``) as the standard error. The resamples are drawn as a ``(B, n)`` matrix of
    case counts from a generator seeded by :func:`bootstrap_seed` of the route name
    (``task@modality``), so the same cases give the same interval on every run, and every
    metric is evaluated for all ``B`` replicates at once with numpy (a weighted sum per
    replicate; the C-index as ``c^T M c`` over a pair matrix ``M``), never in a Python loop
    over replicates. A replicate whose metric is undefined (a C-index resample without a
    comparable pair, a Dice resample without a labelled voxel) is left out.

Pooled interval (:func:`pooled_interval`)
    The pooled value is the case-weighted mean ``sum_i w_i m_i`` with ``w_i = n_i / sum n``.
    The sites' cases are independent strata, so its bootstrap variance is
    ``sum_i w_i^2 se_i^2`` (a stratified bootstrap), and the interval is the normal
    approximation ``pooled +/- 1.96 se``, clipped to the metric's range ``[0, 1]``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "CI_METHOD",
    "DEFAULT_REPLICATES",
    "Z_95",
    "Interval",
    "accuracy_interval",
    "bootstrap_counts",
    "bootstrap_interval",
    "bootstrap_seed",
    "cindex_interval",
    "dice_interval",
    "intervals_overlap",
    "pooled_interval",
]

DEFAULT_REPLICATES = 200
"""Bootstrap resamples ``B`` per site and route."""

LEVEL = 0.95
"""Coverage of every interval."""

Z_95 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal (the pooled interval's half-width / se)."""

CI_METHOD = (
    f"95% intervals. Per site: percentile bootstrap over the site's evaluated cases "
    f"(B={DEFAULT_REPLICATES} resamples, seeded by the route name), computed at the site. "
    "Case-weighted mean of the sites: normal approximation of the stratified bootstrap, "
    "mean +/- 1.96 * sqrt(sum_i w_i^2 se_i^2) with w_i = n_i / sum n and se_i each site's "
    "bootstrap standard error, clipped to [0, 1]"
)
"""How every interval in ``results.json`` is computed (``R_ci_method``)."""

# Largest number of (row x case) cells of the C-index pair matrix built at once.
_MAX_PAIR_CELLS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A 95 % interval and the bootstrap standard error of a metric (NaN when undefined)."""

    lo: float
    hi: float
    se: float

    @classmethod
    def undefined(cls) -> Interval:
        """The interval of a metric that cannot be bootstrapped (all NaN)."""
        return cls(math.nan, math.nan, math.nan)


def bootstrap_seed(name: str) -> int:
    """A stable 63-bit seed from ``name`` (e.g. ``"lesion-class@ct"``), equal on every run.

    Python's ``hash`` of a string changes between processes, so the seed is taken from the
    first 8 bytes of the name's SHA-256 instead.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") >> 1


def bootstrap_counts(
    n: int, *, replicates: int = DEFAULT_REPLICATES, seed: int
) -> NDArray[np.intp]:
    """Case counts of ``replicates`` resamples with replacement of ``n`` cases.

    Returns
    -------
    NDArray
        Integer matrix of shape ``(replicates, n)``; row ``b`` says how many times each case
        occurs in resample ``b`` (each row sums to ``n``).

    Raises
    ------
    ValueError
        If ``n`` or ``replicates`` is below 1.
    """
    if n < 1 or replicates < 1:
        raise ValueError(f"need at least one case and one replicate, got n={n}, B={replicates}")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(replicates, n))
    offsets = (np.arange(replicates) * n)[:, None]
    counts = np.bincount((index + offsets).ravel(), minlength=replicates * n)
    return counts.reshape(replicates, n)


def bootstrap_interval(replicates: ArrayLike) -> Interval:
    """Percentile 95 % interval and standard error of bootstrap replicates (NaNs left out).

    Returns :meth:`Interval.undefined` with fewer than two finite replicates.
    """
    values = np.asarray(replicates, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        return Interval.undefined()
    tail = 100.0 * (1.0 - LEVEL) / 2.0
    lo, hi = np.percentile(values, [tail, 100.0 - tail])
    return Interval(float(lo), float(hi), float(np.std(values, ddof=1)))


def accuracy_interval(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    *,
    seed: int,
    replicates: int = DEFAULT_REPLICATES,
) -> Interval:
    """Bootstrap interval of the accuracy ``mean(y_true == y_pred)``.

    Parameters
    ----------
    y_true, y_pred
        True and predicted labels, shape ``(n,)``.
    seed
        Generator seed, e.g. :func:`bootstrap_seed` of the route.
    replicates
        Number of resamples ``B``.
    """
    truth, pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true has {truth.shape[0]} samples but y_pred has {pred.shape[0]}: "
            "pass one prediction per sample"
        )
    if truth.size == 0:
        return Interval.undefined()
    correct = (truth == pred).astype(np.float64)
    counts = bootstrap_counts(truth.size, replicates=replicates, seed=seed)
    return bootstrap_interval(counts @ correct / truth.size)


def dice_interval(
    per_case: ArrayLike, *, seed: int, replicates: int = DEFAULT_REPLICATES
) -> Interval:
    """Bootstrap interval of the mean Dice from per-case, per-label Dice scores.

    The statistic is the one of :func:`unicon_model.metrics.segmentation.mean_dice`: per
    label the mean over the cases whose target has the label (NaN entries left out), then
    the mean over labels with a defined value.

    Parameters
    ----------
    per_case
        Dice of each case and foreground label, shape ``(n, labels)``, NaN where the
        target lacks the label (:func:`unicon_model.metrics.segmentation.dice_per_case`).
    seed, replicates
        As in :func:`accuracy_interval`.
    """
    scores = np.asarray(per_case, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2 or scores.shape[0] == 0:
        return Interval.undefined()
    present = np.isfinite(scores)
    counts = bootstrap_counts(scores.shape[0], replicates=replicates, seed=seed).astype(float)
    sums = counts @ np.where(present, scores, 0.0)
    cases = counts @ present.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_label = np.where(cases > 0, sums / np.where(cases > 0, cases, 1.0), np.nan)
    defined = np.isfinite(per_label)
    label_count = defined.sum(axis=1)
    replicate = np.where(
        label_count > 0,
        np.where(defined, per_label, 0.0).sum(axis=1) / np.maximum(label_count, 1),
        np.nan,
    )
    return bootstrap_interval(replicate)


def cindex_interval(
    time: ArrayLike,
    risk: ArrayLike,
    event: ArrayLike,
    *,
    seed: int,
    replicates: int = DEFAULT_REPLICATES,
) -> Interval:
    """Bootstrap interval of Harrell's C-index (the statistic of ``concordance_index``).

    A resample holding case ``a`` ``c_a`` times and case ``b`` ``c_b`` times contains
    ``c_a * c_b`` copies of the pair ``(a, b)`` (a case paired with its own copy is never
    comparable: same time, same event), so with the ``(n, n)`` matrices ``P`` (comparable)
    and ``M`` (concordant + 0.5 tied) the replicate is ``c^T M c / c^T P c``, evaluated for
    all replicates at once in blocks of rows.
    """
    times = np.asarray(time, dtype=np.float64).ravel()
    risks = np.asarray(risk, dtype=np.float64).ravel()
    events = np.asarray(event, dtype=np.float64).ravel().astype(bool)
    if not (times.shape == risks.shape == events.shape):
        raise ValueError(
            f"time, risk and event must have the same length, got {times.shape[0]}, "
            f"{risks.shape[0]} and {events.shape[0]}"
        )
    n = times.size
    if n < 2:
        return Interval.undefined()
    counts = bootstrap_counts(n, replicates=replicates, seed=seed).astype(np.float64)
    censored = ~events
    numerator = np.zeros(replicates)
    denominator = np.zeros(replicates)
    block = max(1, _MAX_PAIR_CELLS // n)
    for start in range(0, n, block):
        rows = np.arange(start, min(n, start + block))
        row_time, row_risk = times[rows, None], risks[rows, None]
        comparable = events[rows, None] & (
            (times[None, :] > row_time) | ((times[None, :] == row_time) & censored[None, :])
        )
        score = comparable * ((row_risk > risks[None, :]) + 0.5 * (row_risk == risks[None, :]))
        numerator += np.einsum("br,br->b", counts[:, rows], counts @ score.T)
        denominator += np.einsum("br,br->b", counts[:, rows], counts @ comparable.T)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicate = np.where(denominator > 0, numerator / np.maximum(denominator, 1.0), np.nan)
    return bootstrap_interval(replicate)


def pooled_interval(
    values: Sequence[float],
    standard_errors: Sequence[float],
    cases: Sequence[float],
    *,
    lower: float = 0.0,
    upper: float = 1.0,
) -> tuple[float, Interval]:
    """Case-weighted mean of site metrics and its stratified-bootstrap normal interval.

    Parameters
    ----------
    values
        Each site's metric.
    standard_errors
        Each site's bootstrap standard error (NaN if the site sent none).
    cases
        Each site's number of evaluated cases ``n_i`` (the weights).
    lower, upper
        Range of the metric; the interval is clipped to it.

    Returns
    -------
    tuple
        ``(mean, Interval)`` with ``mean = sum_i w_i m_i``, ``w_i = n_i / sum n``,
        ``se = sqrt(sum_i w_i^2 se_i^2)`` and ``[mean - 1.96 se, mean + 1.96 se]`` clipped to
        ``[lower, upper]``. The interval is undefined (NaN) if any site lacks a standard
        error: an interval that silently treated it as exact would be too narrow.

    Raises
    ------
    ValueError
        If the lengths differ, or no site has a positive case count.
    """
    if not len(values) == len(standard_errors) == len(cases):
        raise ValueError(
            f"values, standard_errors and cases must have one entry per site, got "
            f"{len(values)}, {len(standard_errors)} and {len(cases)}"
        )
    weights = np.asarray(cases, dtype=np.float64)
    if weights.size == 0 or not np.all(weights >= 0) or weights.sum() <= 0:
        raise ValueError(f"cases must be non-negative counts with a positive sum, got {cases}")
    weights = weights / weights.sum()
    mean = float(np.dot(weights, np.asarray(values, dtype=np.float64)))
    errors = np.asarray(standard_errors, dtype=np.float64)
    if not np.all(np.isfinite(errors)):
        return mean, Interval.undefined()
    se = float(np.sqrt(np.sum(weights**2 * errors**2)))
    lo = min(max(mean - Z_95 * se, lower), upper)
    hi = min(max(mean + Z_95 * se, lower), upper)
    return mean, Interval(lo, hi, se)


def intervals_overlap(first: Sequence[float], second: Sequence[float]) -> bool | None:
    """Whether two ``[lo, hi]`` intervals overlap; ``None`` if either is missing or NaN."""
    if len(first) != 2 or len(second) != 2:
        return None
    bounds = [first[0], first[1], second[0], second[1]]
    if any(b is None or not math.isfinite(b) for b in bounds):
        return None
    return not (first[1] < second[0] or second[1] < first[0])
