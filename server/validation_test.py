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
