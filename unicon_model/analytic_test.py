"""The analytic ridge head: federated statistics equal pooled sklearn Ridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from unicon_model.analytic import (
    AnalyticHead,
    RidgeStatistics,
    merge_statistics,
    one_hot_targets,
)
from unicon_model.errors import AnalyticHeadError, ComponentError


def classification_problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=300)
    centres = rng.normal(size=(4, 20)) * 2
    features = centres[labels] + rng.normal(size=(300, 20))
    return features, labels


@pytest.mark.parametrize("split", ["iid", "one-class-per-site"])
def test_federated_statistics_equal_pooled_ridge(split: str) -> None:
    # Prepare: three sites, IID or each holding one class only
    x, labels = classification_problem()
    y = one_hot_targets(labels, 4)
    if split == "iid":
        parts = np.array_split(np.random.default_rng(1).permutation(len(x)), 3)
    else:
        parts = [np.flatnonzero(labels == c) for c in range(3)]
        parts[2] = np.concatenate([parts[2], np.flatnonzero(labels == 3)])
    # Execute
    merged = merge_statistics(RidgeStatistics.from_data(x[p], y[p]) for p in parts)
    weight, bias = merged.solve(l2=2.0)
    # Assert
    reference = Ridge(alpha=2.0).fit(x, y)
    np.testing.assert_allclose(weight, reference.coef_.T, atol=1e-8)
    np.testing.assert_allclose(bias, reference.intercept_, atol=1e-8)
    np.testing.assert_allclose(x @ weight + bias, reference.predict(x), atol=1e-8)


def test_merge_order_and_zeros_do_not_matter() -> None:
    x, labels = classification_problem(2)
    y = one_hot_targets(labels, 4)
    a, b, c = (RidgeStatistics.from_data(x[i::3], y[i::3]) for i in range(3))
    left, right = (a + b) + c, c + (b + a)
    np.testing.assert_allclose(left.gram, right.gram, rtol=1e-14)
    np.testing.assert_allclose(left.solve(l2=1.0)[0], right.solve(l2=1.0)[0], rtol=1e-10)
    assert (a + RidgeStatistics.zeros(20, 4)).count == a.count
    np.testing.assert_array_equal((a + RidgeStatistics.zeros(20, 4)).cross, a.cross)


def test_without_intercept_matches_sklearn() -> None:
    x, labels = classification_problem(3)
    y = one_hot_targets(labels, 4)
    weight, bias = RidgeStatistics.from_data(x, y).solve(l2=0.7, fit_intercept=False)
    reference = Ridge(alpha=0.7, fit_intercept=False).fit(x, y)
    np.testing.assert_allclose(weight, reference.coef_.T, atol=1e-8)
    assert np.all(bias == 0)


def test_arrays_roundtrip_and_every_problem_reported() -> None:
    x, labels = classification_problem()
    stats = RidgeStatistics.from_data(x, one_hot_targets(labels, 4))
    again = RidgeStatistics.from_arrays(stats.to_arrays())
    assert again.count == 300
    np.testing.assert_array_equal(again.gram, stats.gram)
    broken = stats.to_arrays()
    del broken["target_sum"]
    broken["gram"] = np.zeros((3, 3))
    with pytest.raises(AnalyticHeadError) as caught:
        RidgeStatistics.from_arrays(broken)
    assert "missing 'target_sum'" in str(caught.value)
    assert "'gram' has shape (3, 3), expected (20, 20)" in str(caught.value)
    with pytest.raises(AnalyticHeadError, match="cannot merge"):
        stats.merge(RidgeStatistics.zeros(3, 4))


def test_head_forward_uses_the_installed_solution() -> None:
    head = AnalyticHead(20, 4)
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(20, 4)), rng.normal(size=4)
    head.set_solution(weight, bias)
    features = torch.randn(5, 20)
    expected = features.double().numpy() @ weight + bias
    np.testing.assert_allclose(head(features).double().numpy(), expected, atol=1e-5)
    assert set(head.state_dict()) == {"weight", "bias"} and list(head.parameters()) == []
    with pytest.raises(ComponentError, match=r"expected \(20, 4\)"):
        head.set_solution(weight.T, bias)
