"""Segmentation head: the output bias starts at the plan's foreground prior."""

from __future__ import annotations

import math

import pytest
import torch

from unicon_model.heads import SegmentationHead


def test_a_new_segmentation_head_predicts_the_prior_odds_not_foreground_everywhere() -> None:
    torch.manual_seed(0)
    head = SegmentationHead(3, [4, 8, 16], 3, norm="group", foreground_prior=0.01)
    # background 0, each of the two labels log(0.005 / 0.99)
    expected = math.log(0.01 / (2 * 0.99))
    assert head.out.bias is not None
    assert head.out.bias.tolist() == pytest.approx([0.0, expected, expected])
    features = [torch.randn(2, 4, 8, 8, 8), torch.randn(2, 8, 4, 4, 4), torch.randn(2, 16, 2, 2, 2)]
    with torch.no_grad():
        probabilities = head(features).softmax(1)
    # argmax is background nearly everywhere, and the mean foreground mass is near the prior
    assert (probabilities.argmax(1) > 0).float().mean() < 0.01
    assert 0.002 < float(probabilities[:, 1:].sum(1).mean()) < 0.05


def test_the_prior_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="foreground_prior"):
        SegmentationHead(3, [4, 8], 2, norm="group", foreground_prior=1.0)
