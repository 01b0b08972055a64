"""Fairness across sites by hand, and sensitivity/specificity against sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import recall_score

from unicon_model.metrics.fairness import sensitivity_specificity, site_spread


def test_site_spread_by_hand() -> None:
    spread = site_spread({"a": 0.9, "b": 0.6, "c": 0.75, "d": math.nan}, {"a": 30, "b": 10, "c": 0})
    assert spread is not None
    assert (spread["worst_site"], spread["worst"]) == ("b", 0.6)
    assert (spread["best_site"], spread["best"]) == ("a", 0.9)
    assert spread["gap"] == pytest.approx(0.3) and spread["sites"] == 3
    # weights 30 and 10 (c has no cases): mean 0.825, SD sqrt(.75 * .075^2 + .25 * .225^2)
    assert spread["mean"] == pytest.approx(0.825)
    assert spread["sd"] == pytest.approx(math.sqrt(0.75 * 0.075**2 + 0.25 * 0.225**2))
    assert site_spread({"a": math.nan}, {"a": 3}) is None
    assert math.isnan(float(site_spread({"a": 0.5}, {})["sd"]))  # type: ignore[index]


def test_sensitivity_specificity_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    sens, spec = sensitivity_specificity(truth, pred)
    assert sens == pytest.approx(recall_score(truth, pred, pos_label=1))
    assert spec == pytest.approx(recall_score(truth, pred, pos_label=0))
    truth, pred = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    sens, spec = sensitivity_specificity(truth, pred, num_classes=3)
    assert sens == pytest.approx(recall_score(truth, pred, average="macro"))
    one_vs_rest = [recall_score(truth != c, pred != c) for c in range(3)]
    assert spec == pytest.approx(np.mean(one_vs_rest))


def test_undefined_rates_are_nan() -> None:
    sens, spec = sensitivity_specificity([0, 0, 0], [0, 1, 0])
    assert math.isnan(sens) and spec == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one prediction per sample"):
        sensitivity_specificity([0, 1], [0])
