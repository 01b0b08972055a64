"""Calibration: Brier score, expected calibration error, reliability bins, survival IBS.

Classification
    * :func:`brier_score` - binary: ``mean((p_1 - y)^2)``, equal to
      ``sklearn.metrics.brier_score_loss(y, p_1)``; more than two classes: the mean over cases
      of ``sum_k (p_k - onehot_k)^2``, equal to ``brier_score_loss(y, p, labels=...)``.
    * :func:`reliability_bins` - top-label reliability diagram: the confidence of a case is
      its largest class probability, it is correct when that class is the label; the
      confidences fall into :data:`DEFAULT_BINS` = 10 equal-width bins over ``[0, 1]`` (bin
      ``k`` holds ``k/10 < p <= (k+1)/10``; ``p = 0`` goes to bin 0, as in
      ``sklearn.calibration.calibration_curve(correct, confidence, strategy="uniform")``).
      Per bin: the count, the mean confidence and the accuracy. Sites send these per bin;
      the coordinator sums counts and count-weights the means (:func:`merge_bins`), so the
      federation's diagram is the one of the union of the cases.
    * :func:`expected_calibration_error` - ``sum_k (n_k / n) |accuracy_k - confidence_k|``.

Survival
    :func:`integrated_brier_score` - Graf et al. (1999) Brier score with inverse probability
    of censoring weights, averaged over the evaluation times by the trapezoidal rule, with the
    same conventions as ``sksurv.metrics.integrated_brier_score`` (checked against it in the
    tests). The model gives a Cox risk score, not a survival curve, so the survival
    probabilities come from the Breslow baseline hazard of the evaluated cases
    (``S(t | x) = exp(-H0(t) exp(risk))``) and the censoring distribution is the
    Kaplan-Meier estimate of the same cases: a site has only its evaluated split at hand,
    so both are estimated in-sample (slightly optimistic on small splits). The evaluation
    times are the :data:`IBS_QUANTILES` (10 %, 20 %, ..., 80 %) quantiles of the observed
    times, inside the follow-up as the IPCW weights need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BINS",
    "IBS_QUANTILES",
    "ReliabilityBins",
    "breslow_survival",
    "brier_score",
    "censoring_survival",
    "expected_calibration_error",
    "integrated_brier_score",
    "merge_bins",
    "reliability_bins",
    "survival_brier_scores",
]

DEFAULT_BINS = 10
"""Equal-width confidence bins of the reliability diagram and the ECE."""

IBS_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
"""Quantiles of the evaluated cases' observed times at which the survival Brier score is taken."""


def _probabilities(
    y_true: ArrayLike, probs: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Labels as int64 ``(n,)`` and probabilities as float64 ``(n, k)``, checked."""
    labels = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    if labels.ndim != 1 or p.ndim != 2 or labels.shape[0] != p.shape[0] or p.shape[0] == 0:
        raise ValueError(
            "y_true must have shape (n,) and probs (n,) or (n, k) with the same n > 0, got "
            f"{labels.shape} and {np.asarray(probs).shape}"
        )
    if p.shape[1] < 2 or not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise ValueError("probs must be finite probabilities in [0, 1] over at least 2 classes")
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"y_true must hold integer labels in 0..{p.shape[1] - 1}")
    return labels.astype(np.int64), p


def brier_score(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Brier score of class probabilities (lower is better).

    Parameters
    ----------
    y_true
        Integer labels, shape ``(n,)``.
    probs
        Class probabilities, shape ``(n, k)`` (rows sum to 1), or ``(n,)`` for the
        probability of class 1 of a binary task.

    Returns
    -------
    float
        Binary: ``mean((p_1 - y)^2)`` in ``[0, 1]``; ``k > 2``: mean over cases of
        ``sum_k (p_k - onehot_k)^2`` in ``[0, 2]`` (``sklearn.metrics.brier_score_loss``'s
        conventions).
    """
    labels, p = _probabilities(y_true, probs)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - labels) ** 2))
    onehot = np.eye(p.shape[1])[labels]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


@dataclass(frozen=True)
class ReliabilityBins:
    """Top-label reliability diagram data: per equal-width bin count, confidence, accuracy.

    ``confidence`` and ``accuracy`` are NaN for an empty bin.
    """

    counts: list[int]
    confidence: list[float]
    accuracy: list[float]

    @property
    def total(self) -> int:
        """Number of cases over all bins."""
        return int(sum(self.counts))

    def ece(self) -> float:
        """Expected calibration error ``sum_k (n_k / n) |accuracy_k - confidence_k|``."""
        if self.total == 0:
            return math.nan
        return float(
            sum(
                n * abs(a - c)
                for n, a, c in zip(self.counts, self.accuracy, self.confidence, strict=True)
                if n > 0
            )
            / self.total
        )


def reliability_bins(
    y_true: ArrayLike, probs: ArrayLike, *, bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    """Per-bin count, mean confidence and accuracy of the top-label predictions.

    Parameters
    ----------
    y_true
        Integer labels, shape ``(n,)``.
    probs
        Class probabilities, shape ``(n, k)`` or ``(n,)`` (binary, probability of class 1).
    bins
        Number of equal-width bins over ``[0, 1]``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    labels, p = _probabilities(y_true, probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence)  # as sklearn's calibration_curve
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return _bins_of_sums(counts, conf_sum, correct_sum)


def _bins_of_sums(
    counts: NDArray[np.integer], conf_sum: NDArray[np.number], correct_sum: NDArray[np.number]
) -> ReliabilityBins:
    """Reliability bins from per-bin counts and summed confidence and correctness (an empty
    bin's means are NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf_sum / np.maximum(counts, 1), np.nan)
        mean_acc = np.where(counts > 0, correct_sum / np.maximum(counts, 1), np.nan)
    return ReliabilityBins(
        counts=[int(c) for c in counts],
        confidence=[float(c) for c in mean_conf],
        accuracy=[float(a) for a in mean_acc],
    )


def expected_calibration_error(
    y_true: ArrayLike, probs: ArrayLike, *, bins: int = DEFAULT_BINS
) -> float:
    """Top-label expected calibration error over ``bins`` equal-width bins (lower is better)."""
    return reliability_bins(y_true, probs, bins=bins).ece()


def merge_bins(parts: Sequence[ReliabilityBins]) -> ReliabilityBins:
    """The reliability bins of the union of several sites' cases: counts summed, means
    count-weighted.

    Raises
    ------
    ValueError
        If the parts have different numbers of bins, or there are none.
    """
    if not parts:
        raise ValueError("merge_bins needs at least one set of bins")
    sizes = {len(p.counts) for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"every site must send the same number of bins, got {sorted(sizes)}")
    counts = np.sum([p.counts for p in parts], axis=0)
    weighted_conf = np.sum(
        [np.nan_to_num(np.asarray(p.confidence)) * np.asarray(p.counts) for p in parts], axis=0
    )
    weighted_acc = np.sum(
        [np.nan_to_num(np.asarray(p.accuracy)) * np.asarray(p.counts) for p in parts], axis=0
    )
    return _bins_of_sums(counts, weighted_conf, weighted_acc)


def _survival_inputs(
    time: ArrayLike, event: ArrayLike, name: str = "time"
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    times = np.asarray(time, dtype=np.float64).ravel()
    events = np.asarray(event, dtype=np.float64).ravel()
    if times.shape != events.shape or times.size == 0:
        raise ValueError(
            f"{name} and event must be non-empty with the same length, got {times.size} and "
            f"{events.size}"
        )
    if not np.all(np.isfinite(times)) or not np.all((events == 0) | (events == 1)):
        raise ValueError(f"{name} must be finite and event must hold only 0 and 1")
    return times, events.astype(bool)


def censoring_survival(time: ArrayLike, event: ArrayLike, at: ArrayLike) -> NDArray[np.float64]:
    """Kaplan-Meier estimate ``G(t) = P(C > t)`` of the censoring distribution at ``at``.

    Censorings are the "events" of this estimate; at a time with both, the events leave the
    risk set first (``sksurv``'s ``CensoringDistributionEstimator`` convention). ``G`` is a
    right-continuous step function, 1 before the first censoring; without any censoring it
    is 1 everywhere.
    """
    times, events = _survival_inputs(time, event)
    points = np.asarray(at, dtype=np.float64).ravel()
    unique = np.unique(times)
    at_risk = (times[None, :] >= unique[:, None]).sum(axis=1)
    died = (events[None, :] & (times[None, :] == unique[:, None])).sum(axis=1)
    cens = (~events[None, :] & (times[None, :] == unique[:, None])).sum(axis=1)
    remaining = at_risk - died
    with np.errstate(invalid="ignore", divide="ignore"):
        factor = np.where(cens > 0, 1.0 - cens / np.maximum(remaining, 1), 1.0)
    curve = np.cumprod(factor)
    index = np.searchsorted(unique, points, side="right") - 1
    return np.where(index >= 0, curve[np.maximum(index, 0)], 1.0)


def breslow_survival(
    time: ArrayLike, event: ArrayLike, risk: ArrayLike, at: ArrayLike
) -> NDArray[np.float64]:
    """Survival probabilities ``S(t | x_i) = exp(-H0(t) exp(risk_i))`` at the times ``at``.

    ``H0`` is Breslow's baseline cumulative hazard of the same cases:
    ``H0(t) = sum_{event times s <= t} d_s / sum_{j: t_j >= s} exp(risk_j)``, computed in
    log space so large risks do not overflow.

    Returns
    -------
    NDArray
        Shape ``(n, len(at))``.
    """
    times, events = _survival_inputs(time, event)
    risks = np.asarray(risk, dtype=np.float64).ravel()
    if risks.shape != times.shape or not np.all(np.isfinite(risks)):
        raise ValueError(f"risk must be finite with one value per case, got shape {risks.shape}")
    points = np.asarray(at, dtype=np.float64).ravel()
    event_times = np.unique(times[events])
    if event_times.size == 0:
        return np.ones((times.size, points.size))
    deaths = (events[None, :] & (times[None, :] == event_times[:, None])).sum(axis=1)
    order = np.argsort(-times, kind="mergesort")
    log_cum = np.logaddexp.accumulate(risks[order])  # log sum exp over times >= t (descending)
    descending = times[order]
    last = np.searchsorted(-descending, -event_times, side="right") - 1
    log_increment = np.log(deaths) - log_cum[last]  # log of H0's jump at each event time
    # log H_i(t) = risk_i + log sum_{s <= t} exp(log_increment_s)
    cumulative = np.logaddexp.accumulate(log_increment)
    index = np.searchsorted(event_times, points, side="right") - 1
    log_h0 = np.where(index >= 0, cumulative[np.maximum(index, 0)], -np.inf)
    hazard = np.exp(np.minimum(risks[:, None] + log_h0[None, :], 700.0))
    return np.exp(-hazard)


def survival_brier_scores(
    time: ArrayLike, event: ArrayLike, survival: ArrayLike, at: ArrayLike
) -> NDArray[np.float64]:
    """IPCW Brier score (Graf et al. 1999) at each time in ``at``.

    ``BS(t) = mean_i [S_i(t)^2 1(T_i <= t, event_i) / G(T_i) + (1 - S_i(t))^2 1(T_i > t) /
    G(t)]`` with ``G`` from :func:`censoring_survival` of the same cases; a term whose ``G``
    is 0 counts 0 (as in ``sksurv``).

    Parameters
    ----------
    time, event
        Observed times and event indicators of the cases, shape ``(n,)``.
    survival
        Predicted survival probabilities, shape ``(n, len(at))``.
    at
        Evaluation times.
    """
    times, events = _survival_inputs(time, event)
    points = np.asarray(at, dtype=np.float64).ravel()
    surv = np.asarray(survival, dtype=np.float64).reshape(times.size, points.size)
    g_points = censoring_survival(times, events, points)
    g_times = censoring_survival(times, events, times)
    inv_points = np.where(g_points > 0, 1.0 / np.where(g_points > 0, g_points, 1.0), 0.0)
    inv_times = np.where(g_times > 0, 1.0 / np.where(g_times > 0, g_times, 1.0), 0.0)
    case = (times[:, None] <= points[None, :]) & events[:, None]
    control = times[:, None] > points[None, :]
    terms = surv**2 * case * inv_times[:, None] + (1.0 - surv) ** 2 * control * inv_points[None, :]
    return np.asarray(terms.mean(axis=0), dtype=np.float64)  # numpy types mean() as Any


def integrated_brier_score(
    time: ArrayLike,
    event: ArrayLike,
    risk: ArrayLike,
    *,
    quantiles: Sequence[float] = IBS_QUANTILES,
) -> float:
    """Integrated Brier score of a Cox risk score on the evaluated cases (lower is better).

    The survival curves come from :func:`breslow_survival`, the Brier scores from
    :func:`survival_brier_scores` at the ``quantiles`` of the observed times (duplicates
    dropped), and the result is their trapezoidal integral divided by the time span.

    Returns
    -------
    float
        The IBS in ``[0, 1]``; NaN when it is undefined (no event, or fewer than two distinct
        evaluation times).
    """
    times, events = _survival_inputs(time, event)
    if not events.any():
        return math.nan
    at = np.unique(np.quantile(times, quantiles))
    if at.size < 2:
        return math.nan
    survival = breslow_survival(times, events, risk, at)
    scores = survival_brier_scores(times, events, survival, at)
    return float(np.trapezoid(scores, at) / (at[-1] - at[0]))
