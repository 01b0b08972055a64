"""Classification metrics: accuracy and rank-based ROC AUC (binary and macro one-vs-rest).

Numpy only, so sites can score without scikit-learn installed; the tests check both functions
against :mod:`sklearn.metrics`.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = ["accuracy", "roc_auc"]


def _labels(values: ArrayLike, name: str) -> NDArray[np.int64]:
    """Return ``values`` as a 1-D integer array, or raise naming ``name``."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (n,), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: pass at least one sample")
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must hold integer class labels, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf: drop or fix those samples")
        if not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer values")
    return array.astype(np.int64)


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples whose predicted label equals the true label.

    Parameters
    ----------
    y_true
        True integer labels, shape ``(n,)``.
    y_pred
        Predicted integer labels, shape ``(n,)``.

    Returns
    -------
    float
        ``mean(y_true == y_pred)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the arrays are not 1-D, are empty, hold non-integer values or differ in length.
    """
    truth = _labels(y_true, "y_true")
    pred = _labels(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(
            f"y_true has {truth.shape[0]} samples but y_pred has {pred.shape[0]}: "
            "pass one prediction per sample"
        )
    return float(np.mean(truth == pred))


def _midranks(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """1-based ranks of ``values``, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    # Boundaries of runs of equal values: index of each run's start, plus n at the end.
    bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
    counts = np.diff(bounds)
    mean_rank = (bounds[:-1] + 1 + bounds[1:]) / 2.0
    ranks = np.empty(values.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, counts)
    return ranks


def _binary_auc(positive: NDArray[np.bool_], scores: NDArray[np.float64]) -> float:
    """Mann-Whitney AUC of ``scores`` for the ``positive`` mask; NaN if a side is empty."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    u_statistic = float(ranks[positive].sum()) - n_pos * (n_pos + 1) / 2.0
    return u_statistic / (n_pos * n_neg)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve, computed from ranks (Mann-Whitney U with midranks for ties).

    Binary: ``scores`` is 1-D (the score of class 1) or of shape ``(n, 2)`` (column 1 is used),
    and ``y_true`` holds labels in ``{0, 1}``. Multiclass: ``scores`` has shape ``(n, k)`` with
    ``k > 2`` (column ``c`` scores class ``c``), ``y_true`` holds labels in ``{0, ..., k-1}``, and
    the result is the unweighted mean of the ``k`` one-vs-rest AUCs, equal to
    ``sklearn.metrics.roc_auc_score(y_true, scores, multi_class="ovr", average="macro")``.

    Parameters
    ----------
    y_true
        True integer labels, shape ``(n,)``.
    scores
        Scores or probabilities, shape ``(n,)`` or ``(n, k)``; higher means more likely.

    Returns
    -------
    float
        The AUC in ``[0, 1]``. ``nan`` (not an exception) when the AUC is undefined: in the
        binary case when ``y_true`` has no positives or no negatives; in the multiclass case when
        any class has no positives or no negatives (the macro mean is then undefined too).

    Raises
    ------
    ValueError
        If shapes disagree, scores contain NaN/inf, or a label lies outside ``{0, ..., k-1}``.
    """
    truth = _labels(y_true, "y_true")
    score_array = np.asarray(scores, dtype=np.float64)
    if score_array.ndim not in (1, 2):
        raise ValueError(f"scores must have shape (n,) or (n, k), got shape {score_array.shape}")
    if score_array.shape[0] != truth.shape[0]:
        raise ValueError(
            f"y_true has {truth.shape[0]} samples but scores has {score_array.shape[0]} rows: "
            "pass one score row per sample"
        )
    if not np.all(np.isfinite(score_array)):
        raise ValueError("scores contain NaN or inf: drop or fix those samples")
    n_classes = 2 if score_array.ndim == 1 else score_array.shape[1]
    if n_classes < 2:
        raise ValueError(f"scores must have at least 2 columns, got {n_classes}")
    if truth.min() < 0 or truth.max() >= n_classes:
        raise ValueError(
            f"y_true labels must lie in 0..{n_classes - 1} (one per scores column), "
            f"got values in {truth.min()}..{truth.max()}"
        )
    if n_classes == 2:
        positive_scores = score_array if score_array.ndim == 1 else score_array[:, 1]
        result = _binary_auc(truth == 1, positive_scores)
    else:
        per_class = [_binary_auc(truth == c, score_array[:, c]) for c in range(n_classes)]
        result = float(np.mean(per_class))
    if np.isnan(result):
        logger.debug("roc_auc undefined: a class has no positive or no negative samples")
    return result
