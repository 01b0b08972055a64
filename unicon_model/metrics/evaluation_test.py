"""Site extras and the coordinator's combination of them, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unicon_model.metrics.calibration import reliability_bins
from unicon_model.metrics.evaluation import (
    classification_extras,
    combine_sites,
    reliability_from_metrics,
    survival_extras,
)
from unicon_model.metrics.uncertainty import Z_95


def _classification(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([1.0, 1.0], size=n)
    return rng.integers(0, 2, n), probs


def test_classification_extras_hold_interval_rates_calibration_and_bins() -> None:
    labels, probs = _classification(40, 0)
    extras = classification_extras("cls@ct", labels, probs)
    accuracy = float(np.mean(probs.argmax(1) == labels))
    assert extras["accuracy_lo"] <= accuracy <= extras["accuracy_hi"]
    assert extras["accuracy_se"] > 0
    assert {"sensitivity", "specificity", "ece", "brier"} <= set(extras)
    assert extras == classification_extras("cls@ct", labels, probs)  # seeded by the route
    bins = reliability_from_metrics(extras)
    local = reliability_bins(labels, probs)  # what travels rebuilds the same diagram
    assert bins is not None and bins.counts == local.counts
    assert np.allclose(bins.confidence, local.confidence, equal_nan=True)
    assert np.allclose(bins.accuracy, local.accuracy, equal_nan=True)


def test_survival_extras_hold_interval_and_ibs() -> None:
    rng = np.random.default_rng(1)
    time, risk = rng.exponential(size=30) + 0.1, rng.normal(size=30)
    event = (rng.random(30) < 0.7).astype(float)
    extras = survival_extras("surv@ct", time, risk, event)
    assert extras["cindex_lo"] < extras["cindex_hi"] and 0 < extras["ibs"] < 1
    none = survival_extras("surv@ct", time, risk, np.zeros(30))
    assert math.isnan(none["cindex_se"]) and math.isnan(none["ibs"])


def _site(value: float, n: float, se: float, **more: float) -> dict[str, float]:
    return {"accuracy": value, "n": n, "accuracy_lo": value - 0.1, "accuracy_hi": value + 0.1,
            "accuracy_se": se, **more}  # fmt: skip


def test_combine_sites_by_hand() -> None:
    labels_a, probs_a = _classification(30, 2)
    labels_b, probs_b = _classification(10, 3)
    bins_a = classification_extras("c@ct", labels_a, probs_a)
    bins_b = classification_extras("c@ct", labels_b, probs_b)
    sites = {
        "a": {"c@ct": {**bins_a, **_site(0.8, 30, 0.05, ece=0.1)}},
        "b": {"c@ct": {**bins_b, **_site(0.6, 10, 0.1, ece=0.3)}},
    }
    out = combine_sites(sites, {"c@ct": "accuracy"})
    se = math.sqrt(0.75**2 * 0.05**2 + 0.25**2 * 0.1**2)
    assert out["pooled"]["c@ct"] == pytest.approx(0.75)
    assert out["pooled_ci"]["c@ct"] == pytest.approx([0.75 - Z_95 * se, 0.75 + Z_95 * se])
    assert out["per_site_ci"]["b"]["c@ct"] == pytest.approx([0.5, 0.7])
    fairness = out["fairness"]["c@ct"]
    assert fairness["worst_site"] == "b" and fairness["gap"] == pytest.approx(0.2)
    assert set(fairness["per_site"]["a"]) == {"sensitivity", "specificity"}
    calibration = out["calibration"]["c@ct"]
    assert calibration["ece"] == pytest.approx(0.75 * 0.1 + 0.25 * 0.3)
    union = reliability_bins(np.r_[labels_a, labels_b], np.r_[probs_a, probs_b])
    assert calibration["reliability"]["counts"] == union.counts
    assert calibration["ece_merged"] == pytest.approx(union.ece())


def test_a_site_without_standard_error_or_with_bad_bins_is_not_trusted_blindly() -> None:
    sites = {
        "a": {"c@ct": {**_site(0.8, 30, 0.05), "rel0_n": 3.0, "rel0_conf": 0.1, "rel0_acc": 0.0}},
        "b": {"c@ct": {"accuracy": 0.6, "n": 10.0, "rel0_n": -1.0, "rel0_conf": 0.1}},
    }
    out = combine_sites(sites, {"c@ct": "accuracy"})
    assert out["pooled"]["c@ct"] == pytest.approx(0.75)
    assert "c@ct" not in out["pooled_ci"]  # b sent no se: no interval rather than a narrow one
    assert out["calibration"]["c@ct"]["reliability"]["counts"] == [3]  # b's malformed bins left out
    assert reliability_from_metrics({"rel1_n": 1.0, "rel1_conf": 0.5, "rel1_acc": 1.0}) is None
