"""Tests of per-label Dice against hand-computed values and MONAI's compute_dice."""

from __future__ import annotations

import math

import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from unicon_model.metrics.segmentation import dice, mean_dice


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 4x4x4 label maps (labels 0, 1, 2), indexed [item, z, y, x]."""
    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    pred = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    # Item 0. Target: label 1 = slab z=0 (16 voxels); label 2 = row z=1, y=0 (4 voxels).
    target[0, 0] = 1
    target[0, 1, 0] = 2
    # Pred: label 1 = z=0 rows y=0..1 (8, all inside the target) + z=1 rows y=2..3 (8, outside);
    #       label 2 = z=1, y=0, x=0..1 (2 voxels, inside the target's label 2).
    pred[0, 0, 0:2] = 1
    pred[0, 1, 2:4] = 1
    pred[0, 1, 0, 0:2] = 2
    # Item 1. Target: label 1 = slab z=3 (16); no label 2. Pred: label 1 = slab z=3, plus one
    # false-positive voxel of label 2 at (z=0, y=0, x=0).
    target[1, 3] = 1
    pred[1, 3] = 1
    pred[1, 0, 0, 0] = 2
    return pred, target


# Hand arithmetic, Dice = 2 |P & T| / (|P| + |T|):
# item 0, label 1: |P|=16, |T|=16, overlap 8                      -> 16/32 = 0.5
# item 0, label 2: |P|=2,  |T|=4,  overlap 2                      -> 4/6   = 2/3
# item 0, label 0: |T| = 64-16-4 = 44, |P| = 64-16-2 = 46,
#                  overlap = z=1,y=1 (4) + z=2..3 (32) = 36        -> 72/90 = 0.8
# item 1, label 1: |P|=|T|=16, overlap 16                         -> 1.0
# item 1, label 2: absent from the target -> NaN (ignore_empty), left out of the batch mean
# item 1, label 0: |T| = 48, |P| = 47, overlap 47                  -> 94/95
# batch means: label 0 = (0.8 + 94/95) / 2, label 1 = (0.5 + 1) / 2 = 0.75, label 2 = 2/3
BACKGROUND = (0.8 + 94 / 95) / 2
LABEL_1 = 0.75
LABEL_2 = 2 / 3


def test_dice_hand_computed_without_background() -> None:
    # Prepare
    pred, target = tiny_batch()
    # Execute
    scores = dice(pred, target, num_labels=3)
    average = mean_dice(pred, target, num_labels=3)
    # Assert
    assert scores.shape == (2,)
    assert scores.tolist() == pytest.approx([LABEL_1, LABEL_2], abs=1e-6)
    assert average == pytest.approx((LABEL_1 + LABEL_2) / 2, abs=1e-6)  # = 17/24


def test_dice_hand_computed_with_background_and_channel_axis() -> None:
    # Prepare: the same maps with an explicit channel axis (B, 1, D, H, W)
    pred, target = tiny_batch()
    # Execute
    scores = dice(pred[:, None], target[:, None], num_labels=3, include_background=True)
    average = mean_dice(pred[:, None], target[:, None], num_labels=3, include_background=True)
    # Assert
    assert scores.tolist() == pytest.approx([BACKGROUND, LABEL_1, LABEL_2], abs=1e-6)
    assert average == pytest.approx((BACKGROUND + LABEL_1 + LABEL_2) / 3, abs=1e-6)


def test_label_absent_everywhere_is_nan_and_skipped_by_mean() -> None:
    # Prepare: declare a 4th label that occurs in neither prediction nor target
    pred, target = tiny_batch()
    # Execute
    scores = dice(pred, target, num_labels=4)
    average = mean_dice(pred, target, num_labels=4)
    # Assert: label 3 is NaN (MONAI ignore_empty=True), the others unchanged
    assert scores[:2].tolist() == pytest.approx([LABEL_1, LABEL_2], abs=1e-6)
    assert math.isnan(float(scores[2]))
    assert average == pytest.approx((LABEL_1 + LABEL_2) / 2, abs=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
def test_dice_matches_monai_compute_dice(include_background: bool) -> None:
    # Prepare: random 2-D maps with 4 labels; label 3 rare so some items lack it
    generator = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (5, 6, 6), generator=generator)
    target = torch.randint(0, 3, (5, 6, 6), generator=generator)
    target[0, 0, 0] = 3
    pred[1, 2, 2] = 3
    per_item = compute_dice(
        one_hot(pred[:, None], num_classes=4),
        one_hot(target[:, None], num_classes=4),
        include_background=include_background,
    )
    expected = torch.nanmean(per_item, dim=0)
    # Execute
    scores = dice(pred, target, num_labels=4, include_background=include_background)
    # Assert
    torch.testing.assert_close(scores, expected.float(), equal_nan=True)
    assert mean_dice(
        pred, target, num_labels=4, include_background=include_background
    ) == pytest.approx(float(torch.nanmean(expected)), abs=1e-6)


def test_dice_rejects_bad_inputs() -> None:
    pred, target = tiny_batch()
    with pytest.raises(ValueError, match="integer label map"):
        dice(pred.float(), target, num_labels=3)
    with pytest.raises(ValueError, match="num_labels=2"):
        dice(pred, target, num_labels=2)
    with pytest.raises(ValueError, match="shape"):
        dice(pred[:1], target, num_labels=3)
