"""Calibration metrics against sklearn, lifelines, scikit-survival and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from unicon_model.metrics.calibration import (
    IBS_QUANTILES,
    breslow_survival,
    brier_score,
    censoring_survival,
    expected_calibration_error,
    integrated_brier_score,
    merge_bins,
    reliability_bins,
    survival_brier_scores,
)


def _probs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return rng.integers(0, k, n), probs


def test_brier_score_equals_sklearn_binary_and_multiclass() -> None:
    labels, probs = _probs(50, 2, 0)
    assert brier_score(labels, probs) == pytest.approx(brier_score_loss(labels, probs[:, 1]))
    assert brier_score(labels, probs[:, 1]) == pytest.approx(brier_score(labels, probs))
    labels, probs = _probs(50, 4, 1)
    expected = brier_score_loss(labels, probs, labels=[0, 1, 2, 3])
    assert brier_score(labels, probs) == pytest.approx(expected)


def test_reliability_bins_equal_sklearn_calibration_curve() -> None:
    labels, probs = _probs(200, 3, 2)
    probs[:4] = [[0.5, 0.3, 0.2], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.0, 1.0, 0.0]]  # edges
    bins = reliability_bins(labels, probs, bins=10)
    correct = (probs.argmax(1) == labels).astype(int)
    prob_true, prob_pred = calibration_curve(correct, probs.max(1), n_bins=10)
    filled = [k for k, n in enumerate(bins.counts) if n > 0]
    assert [bins.accuracy[k] for k in filled] == pytest.approx(prob_true)
    assert [bins.confidence[k] for k in filled] == pytest.approx(prob_pred)
    assert bins.total == 200 and all(math.isnan(bins.accuracy[k]) for k in range(3))


def test_ece_by_hand() -> None:
    # confidences 0.9, 0.9 (one right) and 0.6 (right): bins 8 and 5
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.4, 0.6]])
    labels = np.array([0, 0, 1])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(labels, probs) == pytest.approx(expected)


def test_merged_bins_equal_the_bins_of_the_union() -> None:
    labels_a, probs_a = _probs(30, 2, 3)
    labels_b, probs_b = _probs(45, 2, 4)
    merged = merge_bins([reliability_bins(labels_a, probs_a), reliability_bins(labels_b, probs_b)])
    union = reliability_bins(np.r_[labels_a, labels_b], np.r_[probs_a, probs_b])
    assert merged.counts == union.counts
    assert np.allclose(merged.confidence, union.confidence, equal_nan=True)
    assert np.allclose(merged.accuracy, union.accuracy, equal_nan=True)
    assert merged.ece() == pytest.approx(union.ece())
    with pytest.raises(ValueError, match="same number of bins"):
        merge_bins([reliability_bins(labels_a, probs_a, bins=5), union])


def test_bad_probabilities_are_refused() -> None:
    with pytest.raises(ValueError, match=r"labels in 0\.\.1"):
        brier_score([0, 2], [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="finite probabilities"):
        brier_score([0, 1], [[0.5, math.nan], [0.5, 0.5]])


def test_censoring_survival_equals_lifelines_kaplan_meier() -> None:
    from lifelines import KaplanMeierFitter

    rng = np.random.default_rng(5)
    time = rng.permutation(np.arange(1.0, 31.0))  # distinct times: no tie convention involved
    event = rng.random(30) < 0.6
    at = np.array([0.5, 3.0, 7.5, 12.0, 20.0, 29.0])
    fitter = KaplanMeierFitter().fit(time, event_observed=~event)
    expected = fitter.survival_function_at_times(at).to_numpy()
    assert censoring_survival(time, event, at) == pytest.approx(expected)


def test_survival_brier_score_by_hand() -> None:
    # censorings at 2 (3 at risk) and 4 (1 at risk): G(2.5) = 2/3, G(1) = 1
    time, event = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 1, 0])
    survival = np.array([[0.2], [0.5], [0.6], [0.9]])
    expected = (0.2**2 / 1.0 + 0 + 0.4**2 / (2 / 3) + 0.1**2 / (2 / 3)) / 4
    assert survival_brier_scores(time, event, survival, [2.5])[0] == pytest.approx(expected)


def test_breslow_survival_equals_lifelines_cox_model() -> None:
    import pandas as pd
    from lifelines import CoxPHFitter

    rng = np.random.default_rng(6)
    x = rng.normal(size=40)
    time = np.round(rng.exponential(np.exp(-0.8 * x)) * 10 + 0.1, 1)
    event = (rng.random(40) < 0.7).astype(int)
    frame = pd.DataFrame({"x": x, "time": time, "event": event})
    cox = CoxPHFitter().fit(frame, "time", "event")
    at = np.sort(time)[[8, 20, 32]]  # observed times: lifelines interpolates between them
    expected = cox.predict_survival_function(frame[["x"]], times=at).to_numpy().T
    risk = cox.params_["x"] * x  # any shift of the risk leaves S(t | x) unchanged
    assert breslow_survival(time, event, risk + 3.0, at) == pytest.approx(expected, rel=1e-6)


def test_integrated_brier_score_equals_scikit_survival() -> None:
    metrics = pytest.importorskip("sksurv.metrics")
    from sksurv.util import Surv

    rng = np.random.default_rng(7)
    time = rng.integers(1, 15, 60).astype(float)  # ties between events and censorings
    event = rng.random(60) < 0.6
    risk = rng.normal(size=60) * 3
    at = np.unique(np.quantile(time, IBS_QUANTILES))
    survival = breslow_survival(time, event, risk, at)
    y = Surv.from_arrays(event, time)
    expected = metrics.integrated_brier_score(y, y, survival, at)
    assert integrated_brier_score(time, event, risk) == pytest.approx(expected)
    _, scores = metrics.brier_score(y, y, survival, at)
    assert survival_brier_scores(time, event, survival, at) == pytest.approx(scores)


def test_integrated_brier_score_undefined_and_bad_input() -> None:
    assert math.isnan(integrated_brier_score([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(integrated_brier_score([2.0, 2.0, 2.0], [1, 1, 0], [0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="event must hold only 0 and 1"):
        integrated_brier_score([1.0, 2.0], [1, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="one value per case"):
        breslow_survival([1.0, 2.0], [1, 1], [0.1], [1.5])
