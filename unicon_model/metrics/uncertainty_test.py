"""Bootstrap intervals: the vectorised replicates equal a plain loop over the same resamples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unicon_model.metrics.classification import accuracy
from unicon_model.metrics.segmentation import dice_per_case, mean_dice, mean_dice_of_cases
from unicon_model.metrics.survival import concordance_index
from unicon_model.metrics.uncertainty import (
    DEFAULT_REPLICATES,
    Z_95,
    accuracy_interval,
    bootstrap_counts,
    bootstrap_interval,
    bootstrap_seed,
    cindex_interval,
    dice_interval,
    intervals_overlap,
    pooled_interval,
)


def _resamples(n: int, seed: int, replicates: int) -> np.ndarray:
    """The index matrix behind :func:`bootstrap_counts` (same generator, same draw)."""
    return np.random.default_rng(seed).integers(0, n, size=(replicates, n))


def test_counts_are_the_resamples_and_reproducible() -> None:
    counts = bootstrap_counts(7, replicates=5, seed=3)
    index = _resamples(7, 3, 5)
    assert counts.shape == (5, 7) and (counts.sum(axis=1) == 7).all()
    for b in range(5):
        assert counts[b].tolist() == np.bincount(index[b], minlength=7).tolist()
    assert (bootstrap_counts(7, replicates=5, seed=3) == counts).all()
    with pytest.raises(ValueError, match="at least one case"):
        bootstrap_counts(0, seed=1)


def test_seed_is_stable_per_route_and_differs_between_routes() -> None:
    assert bootstrap_seed("lesion-class@ct") == bootstrap_seed("lesion-class@ct")
    assert bootstrap_seed("lesion-class@ct") != bootstrap_seed("lesion-class@pet")
    # sha256-based, not Python's per-process hash(): a fixed number on every run
    assert bootstrap_seed("a@ct") == 2787248866874501021


def test_accuracy_interval_equals_a_loop_over_the_resamples() -> None:
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 3, 40), rng.integers(0, 3, 40)
    index = _resamples(40, 11, 50)
    loop = [accuracy(truth[i], pred[i]) for i in index]
    got = accuracy_interval(truth, pred, seed=11, replicates=50)
    assert got == bootstrap_interval(loop)
    assert got.lo <= accuracy(truth, pred) <= got.hi and got.se > 0


def test_cindex_interval_equals_a_loop_over_the_resamples() -> None:
    rng = np.random.default_rng(1)
    n = 25
    time = rng.integers(1, 10, n).astype(float)  # ties on purpose
    event = (rng.random(n) < 0.6).astype(float)
    risk = np.round(rng.normal(size=n), 1)  # tied risks too
    loop = []
    for i in _resamples(n, 5, 60):
        try:
            loop.append(concordance_index(time[i], risk[i], event[i]))
        except ValueError:
            loop.append(math.nan)
    got = cindex_interval(time, risk, event, seed=5, replicates=60)
    expected = bootstrap_interval(loop)
    assert (got.lo, got.hi, got.se) == pytest.approx((expected.lo, expected.hi, expected.se))


def test_dice_interval_equals_a_loop_and_the_point_value_equals_mean_dice() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (12, 4, 4), generator=gen)
    target = torch.randint(0, 3, (12, 4, 4), generator=gen)
    target[:3][target[:3] == 2] = 1  # label 2 absent in some cases: NaN entries
    per_case = dice_per_case(pred, target, num_labels=3)
    assert mean_dice_of_cases(per_case) == mean_dice(pred, target, num_labels=3)
    loop = [mean_dice_of_cases(per_case[torch.from_numpy(i)]) for i in _resamples(12, 2, 40)]
    got = dice_interval(per_case.numpy(), seed=2, replicates=40)
    expected = bootstrap_interval(loop)
    assert (got.lo, got.hi, got.se) == pytest.approx((expected.lo, expected.hi, expected.se))


def test_degenerate_inputs_give_undefined_intervals() -> None:
    assert math.isnan(accuracy_interval([], [], seed=1).lo)
    assert math.isnan(cindex_interval([1.0], [0.2], [1], seed=1).se)
    assert math.isnan(bootstrap_interval([0.5, math.nan]).hi)  # one finite replicate
    with pytest.raises(ValueError, match="same length"):
        cindex_interval([1.0, 2.0], [0.1], [1, 0], seed=1)


def test_pooled_interval_by_hand_and_clipped() -> None:
    mean, interval = pooled_interval([0.8, 0.6], [0.05, 0.1], [30, 10])
    se = math.sqrt(0.75**2 * 0.05**2 + 0.25**2 * 0.1**2)
    assert mean == pytest.approx(0.75) and interval.se == pytest.approx(se)
    assert (interval.lo, interval.hi) == pytest.approx((0.75 - Z_95 * se, 0.75 + Z_95 * se))
    _, clipped = pooled_interval([0.99], [0.05], [10])
    assert clipped.hi == 1.0 and clipped.lo == pytest.approx(0.99 - Z_95 * 0.05)
    # a site without a standard error: no interval rather than a too narrow one
    assert math.isnan(pooled_interval([0.8, 0.6], [0.05, math.nan], [30, 10])[1].lo)
    with pytest.raises(ValueError, match="one entry per site"):
        pooled_interval([0.8], [0.1, 0.1], [3])
    with pytest.raises(ValueError, match="positive sum"):
        pooled_interval([0.8], [0.1], [0])


def test_intervals_overlap() -> None:
    assert intervals_overlap([0.1, 0.5], [0.4, 0.9]) is True
    assert intervals_overlap([0.1, 0.3], [0.4, 0.9]) is False
    assert intervals_overlap([0.1, math.nan], [0.4, 0.9]) is None


def test_the_default_bootstrap_is_cheap() -> None:
    # B = 200 over 300 survival cases: one pair matrix, no loop over replicates
    rng = np.random.default_rng(0)
    n = 300
    time, risk = rng.exponential(size=n) + 0.01, rng.normal(size=n)
    event = (rng.random(n) < 0.7).astype(float)
    import time as clock

    start = clock.perf_counter()
    interval = cindex_interval(time, risk, event, seed=1)
    assert clock.perf_counter() - start < 0.5
    assert DEFAULT_REPLICATES == 200 and interval.lo < interval.hi
