"""Classification metrics: accuracy and ROC AUC (binary and macro one-vs-rest).

Accuracy is numpy only; ROC AUC is :func:`monai.metrics.compute_roc_auc`, imported on first
use so importing this module stays fast. Neither needs scikit-learn; the tests check both
functions against :mod:`sklearn.metrics`.
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


def _checked_scores(truth: NDArray[np.int64], scores: ArrayLike) -> tuple[NDArray[np.float64], int]:
    """``scores`` as a float array checked against the labels ``truth``, and the class count.

    Raises
    ------
    ValueError
        If shapes disagree, scores contain NaN/inf, or a label lies outside ``{0, ..., k-1}``.
    """
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
    return score_array, int(n_classes)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (a tied pair counts one half), by MONAI's ``compute_roc_auc``.

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
    score_array, n_classes = _checked_scores(truth, scores)
    if n_classes == 2:
        predictions = score_array if score_array.ndim == 1 else score_array[:, 1]
        targets = (truth == 1).astype(np.float64)
        positives = np.array([targets.sum()])
    else:  # one-hot targets: MONAI's "macro" is the mean of the one-vs-rest AUCs
        predictions = score_array
        targets = (truth[:, None] == np.arange(n_classes)).astype(np.float64)
        positives = targets.sum(axis=0)
    if np.any(positives == 0) or np.any(positives == truth.shape[0]):
        logger.debug("roc_auc undefined: a class has no positive or no negative samples")
        return float("nan")
    import torch
    from monai.metrics import compute_roc_auc

    result = compute_roc_auc(
        torch.from_numpy(np.ascontiguousarray(predictions)),
        torch.from_numpy(targets),
        average="macro",
    )
    return float(np.asarray(result))
