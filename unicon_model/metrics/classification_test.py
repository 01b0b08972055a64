"""Tests of accuracy and rank-based ROC AUC against scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from unicon_model.metrics.classification import accuracy, roc_auc


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_matches_sklearn(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 4, size=97)
    y_pred = rng.integers(0, 4, size=97)
    # Execute
    result = accuracy(y_true, y_pred)
    # Assert
    assert result == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-15)


def test_accuracy_hand_computed() -> None:
    # Prepare: 3 of 5 labels agree (positions 0, 2, 4)
    y_true = [0, 1, 2, 1, 0]
    y_pred = [0, 2, 2, 0, 0]
    # Execute / Assert
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 5)


def test_accuracy_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="y_pred"):
        accuracy([0, 1, 1], [0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binary_roc_auc_matches_sklearn_with_ties(seed: int) -> None:
    # Prepare: scores rounded to one decimal, so many ties
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=250)
    scores = np.round(rng.normal(size=250) + 0.5 * y_true, 1)
    expected = roc_auc_score(y_true, scores)
    # Execute
    from_vector = roc_auc(y_true, scores)
    from_two_columns = roc_auc(y_true, np.stack([1 - scores, scores], axis=1))
    # Assert
    assert abs(from_vector - expected) < 1e-12
    assert abs(from_two_columns - expected) < 1e-12


def test_binary_roc_auc_hand_computed() -> None:
    # Prepare: positives score (0.8, 0.4), negatives (0.4, 0.1).
    # Pairs (pos, neg): (0.8,0.4)=1, (0.8,0.1)=1, (0.4,0.4)=0.5 (tie), (0.4,0.1)=1 -> 3.5 / 4
    y_true = [1, 0, 1, 0]
    scores = [0.8, 0.4, 0.4, 0.1]
    # Execute / Assert
    assert roc_auc(y_true, scores) == pytest.approx(3.5 / 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_roc_auc_matches_sklearn_ovr_macro(seed: int) -> None:
    # Prepare: probabilities from small integer counts, so columns have many ties
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 3, size=200)
    counts = rng.integers(0, 5, size=(200, 3)).astype(float) + 1.0
    counts[np.arange(200), y_true] += rng.integers(0, 3, size=200)
    probabilities = counts / counts.sum(axis=1, keepdims=True)
    expected = roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro")
    # Execute
    result = roc_auc(y_true, probabilities)
    # Assert
    assert abs(result - expected) < 1e-12


def test_roc_auc_is_nan_when_a_class_lacks_positives_or_negatives() -> None:
    # Prepare: binary with only positives; 3-class with class 2 absent
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.25, 0.25]])
    # Execute / Assert
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    assert math.isnan(roc_auc([0, 0, 0], [0.2, 0.5, 0.9]))
    assert math.isnan(roc_auc([0, 1, 0], probabilities))


def test_roc_auc_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"y_true labels must lie in 0\.\.2"):
        roc_auc([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="rows"):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_undefined_roc_auc_logs_at_debug_and_warns_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: class 1 of 3 never occurs; MONAI would warn, roc_auc must answer first
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7], [0.5, 0.25, 0.25]])
    caplog.set_level("DEBUG", logger="unicon_model.metrics.classification")
    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = roc_auc([0, 2, 0], probabilities)
        defined = roc_auc([0, 2, 1], probabilities)
    # Assert: only the undefined call logs. Defined one-vs-rest AUCs: class 0 scores 0.6 above
    # 0.2 and 0.5 (1), class 1 scores 0.25 between 0.3 and 0.1 (1/2), class 2 scores 0.7 (1)
    assert math.isnan(result)
    assert [r.getMessage() for r in caplog.records] == [
        "roc_auc undefined: a class has no positive or no negative samples"
    ]
    assert defined == pytest.approx(2.5 / 3)


def test_two_column_scores_use_column_one_only() -> None:
    # Prepare: column 0 is noise, so a one-vs-rest mean over both columns would differ
    y_true = [0, 1, 0, 1, 1]
    scores = np.array([[0.9, 0.1], [0.9, 0.8], [0.1, 0.3], [0.5, 0.3], [0.2, 0.9]])
    # Execute / Assert: pairs (pos, neg) on column 1: 0.8>0.1, 0.8>0.3, 0.3>0.1, 0.3=0.3, 0.9>both
    assert roc_auc(y_true, scores) == pytest.approx(5.5 / 6)
    assert roc_auc(y_true, scores) == pytest.approx(roc_auc_score(y_true, scores[:, 1]))
