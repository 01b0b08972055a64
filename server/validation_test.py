"""Update validation: structure checks and the robust norm rule, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from server.validation import (
    MAD_TO_SIGMA,
    structural_problems,
    update_norm,
    validate_updates,
    weighted_average,
)

REFERENCE = {"w": torch.zeros(4), "b": torch.zeros(1)}


def moved(norm: float) -> dict[str, torch.Tensor]:
    """An update whose L2 distance from the reference is ``norm``."""
    return {"w": torch.tensor([norm, 0.0, 0.0, 0.0]), "b": torch.zeros(1)}


def test_update_norm_is_the_l2_distance_to_the_reference() -> None:
    update = {"w": torch.tensor([3.0, 0.0, 0.0, 0.0]), "b": torch.tensor([4.0])}
    assert update_norm(update, REFERENCE) == pytest.approx(5.0)


def test_honest_non_iid_spread_is_accepted() -> None:
    # norms 1.0, 1.3, 2.9: median 1.3, MAD 0.3 -> median + 5·1.4826·0.3 = 3.52 > 2.9
    verdicts = validate_updates({"a": moved(1.0), "b": moved(1.3), "c": moved(2.9)}, REFERENCE)
    assert [v.accepted for v in verdicts] == [True, True, True]


def test_far_outlier_is_rejected_with_the_limit_in_the_reason() -> None:
    # norms 1.0, 1.1, 1.2, 10: median 1.15, MAD 0.1 -> spread limit 1.15 + 5·1.4826·0.1 = 1.89;
    # ratio limit 3·1.15 = 3.45; the limit is the larger, 3.45: only 10 is rejected
    updates = {"a": moved(1.0), "b": moved(1.1), "c": moved(1.2), "d": moved(10.0)}
    verdicts = validate_updates(updates, REFERENCE)
    assert [v.accepted for v in verdicts] == [True, True, True, False]
    limit = max(1.15 + 5 * MAD_TO_SIGMA * 0.1, 3 * 1.15)
    assert f"{limit:.4g}" in verdicts[3].reason


def test_structural_problems_are_all_listed() -> None:
    bad = {"w": torch.tensor([math.nan, 0.0, 0.0]), "extra": torch.zeros(1)}
    problems = structural_problems(bad, REFERENCE)
    text = " ".join(problems)
    assert "extra" in text and "b" in text and "shape" in text


def test_weighted_average_is_fedavg() -> None:
    merged = weighted_average([moved(1.0), moved(4.0)], [3.0, 1.0])
    assert torch.allclose(merged["w"], torch.tensor([1.75, 0.0, 0.0, 0.0]))


def test_absolute_bound_rejects_a_lone_site_whatever_the_cohort() -> None:
    # update w = [3, 0, 0, 0], b = [4]: norm sqrt(9 + 16) = 5 against the all-zero reference
    update = {"w": torch.tensor([3.0, 0.0, 0.0, 0.0]), "b": torch.tensor([4.0])}
    (verdict,) = validate_updates({"a": update}, REFERENCE, max_norm=4.9)
    assert not verdict.accepted and verdict.norm == pytest.approx(5.0)
    assert "update norm 5 exceeds the stage's max_update_norm 4.9" in verdict.reason
    (verdict,) = validate_updates({"a": update}, REFERENCE, max_norm=5.1)
    assert verdict.accepted


def test_absolute_bound_with_two_sites_and_a_huge_update() -> None:
    # norms 1 and 1e30: the cohort rule needs 3 sites; the absolute bound 1000 catches 1e30
    verdicts = validate_updates({"a": moved(1.0), "b": moved(1e30)}, REFERENCE, max_norm=1000.0)
    assert [v.accepted for v in verdicts] == [True, False]
    assert "1e+30 exceeds the stage's max_update_norm 1000" in verdicts[1].reason
    # without the bound (the old behaviour) both would pass
    assert all(v.accepted for v in validate_updates({"a": moved(1.0), "b": moved(1e30)}, REFERENCE))


def test_the_norm_is_measured_from_the_values_sent_not_from_zero() -> None:
    # reference w = [10, 0, 0, 0]; update w = [10, 3, 0, 0], b = [4]: deviation sqrt(9+16) = 5
    reference = {"w": torch.tensor([10.0, 0.0, 0.0, 0.0]), "b": torch.zeros(1)}
    update = {"w": torch.tensor([10.0, 3.0, 0.0, 0.0]), "b": torch.tensor([4.0])}
    (verdict,) = validate_updates({"a": update}, reference, max_norm=6.0)
    assert verdict.accepted and verdict.norm == pytest.approx(5.0)


def test_an_overflowing_norm_is_rejected() -> None:
    # 1e300² overflows to inf in float64: the norm is inf, never accepted
    huge = {"w": torch.tensor([1e300, 0.0, 0.0, 0.0], dtype=torch.float64), "b": torch.zeros(1)}
    reference = {"w": torch.zeros(4, dtype=torch.float64), "b": torch.zeros(1)}
    (verdict,) = validate_updates({"a": huge}, reference, max_norm=1000.0)
    assert not verdict.accepted and "inf exceeds" in verdict.reason


def test_updates_above_the_bound_do_not_enter_the_cohort_statistics() -> None:
    # norms 1.0, 1.1, 1.2, 2e3 (bounded out), 10: the cohort is 1.0, 1.1, 1.2, 10 as in the
    # outlier test above (limit 3.45), so 10 is still rejected by the cohort rule
    updates = {
        "a": moved(1.0),
        "b": moved(1.1),
        "c": moved(1.2),
        "d": moved(2e3),
        "e": moved(10.0),
    }
    verdicts = validate_updates(updates, REFERENCE, max_norm=1000.0)
    assert [v.accepted for v in verdicts] == [True, True, True, False, False]
    assert "max_update_norm" in verdicts[3].reason and "cohort" in verdicts[4].reason


@pytest.mark.parametrize("bound", [0.0, -1.0, math.nan])
def test_a_non_positive_bound_is_a_programming_error(bound: float) -> None:
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        validate_updates({"a": moved(1.0)}, REFERENCE, max_norm=bound)


@pytest.mark.parametrize("weights", [[1.0, math.nan], [1.0, -1.0], [1.0, math.inf], [0.0, 1.0]])
def test_weighted_average_refuses_bad_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="every weight must be a finite number > 0"):
        weighted_average([moved(1.0), moved(4.0)], weights)
