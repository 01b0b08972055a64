"""The box-prompt benchmark's scoring against Dice computed by hand on small label maps."""

from __future__ import annotations

import numpy as np
import pytest

from simulations.bench_prompts import (
    lesion_volumes_cm3,
    prompted_plan,
    score_box_prompts,
    voxel_volume_mm3,
)
from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run
from simulations.synthetic import SPACING_MM
from unicon_model.schema import validate_plan

SHAPE = (8, 8, 8)
VOXEL = 8.0  # mm³ of a 2 mm voxel: 1 cm³ = 125 voxels


def _map(*voxels: tuple[int, int, int]) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=np.int64)
    for v in voxels:
        out[v] = 1
    return out


def _cases() -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(unprompted, prompted, targets) of four cases; the Dice of each is in the comments."""
    # A: one 2x2x2 lesion (8 voxels, 0.064 cm³); no box finds 4 of them: 2*4/(4+8) = 2/3;
    # the box finds all 8: 1
    a = np.zeros(SHAPE, dtype=np.int64)
    a[1:3, 1:3, 1:3] = 1
    a_half = a.copy()
    a_half[1, :, :] = 0
    # B: one 5x5x5 lesion (125 voxels = 1.0 cm³: not below 1 cm³); no box: exact, 1; the box
    # adds 25 wrong voxels: 2*125/(150+125) = 10/11
    b = np.zeros(SHAPE, dtype=np.int64)
    b[0:5, 0:5, 0:5] = 1
    b_more = b.copy()
    b_more[5, 0:5, 0:5] = 1
    # C: two lesions, corner-touching voxels (0,0,0)-(1,1,1) (one lesion: 26-neighbourhood)
    # and (5,5,5); no box predicts nothing: 0; the box finds the first two: 2*2/(2+3) = 0.8
    c = _map((0, 0, 0), (1, 1, 1), (5, 5, 5))
    c_boxed = _map((0, 0, 0), (1, 1, 1))
    # D: no lesion: left out of every figure, whatever is predicted
    d = np.zeros(SHAPE, dtype=np.int64)
    unprompted = [a_half, b, np.zeros(SHAPE, dtype=np.int64), _map((3, 3, 3))]
    prompted = [a, b_more, c_boxed, d]
    return unprompted, prompted, [a, b, c, d]


def test_voxel_volume_is_the_generators_spacing_or_the_plans() -> None:
    assert voxel_volume_mm3(None) == SPACING_MM**3 == VOXEL
    assert voxel_volume_mm3((1.0, 2.0, 1.5)) == 3.0
    assert voxel_volume_mm3(None, dims=2) == SPACING_MM**2


def test_lesions_are_26_connected_components_with_their_volume() -> None:
    _, _, targets = _cases()
    assert lesion_volumes_cm3(targets[0], VOXEL) == [pytest.approx(0.064)]
    assert lesion_volumes_cm3(targets[1], VOXEL) == [pytest.approx(1.0)]
    assert sorted(lesion_volumes_cm3(targets[2], VOXEL)) == [
        pytest.approx(0.008),
        pytest.approx(0.016),
    ]
    assert lesion_volumes_cm3(targets[3], VOXEL) == []


def test_dice_with_and_without_the_box_by_hand_and_the_small_lesion_split() -> None:
    unprompted, prompted, targets = _cases()
    scores = score_box_prompts(unprompted, prompted, targets, num_labels=2, voxel_mm3=VOXEL)
    every, small = scores["all"], scores["small_lesions"]
    assert every["cases"] == 3 and every["lesions"] == 4  # D has no lesion
    assert every["unprompted"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert every["prompted"] == pytest.approx((1 + 10 / 11 + 0.8) / 3)
    assert every["gain"] == pytest.approx(every["prompted"] - every["unprompted"])
    # B's lesion is 1.0 cm³, not below the threshold: A and C only
    assert small["cases"] == 2 and small["lesions"] == 3
    assert small["unprompted"] == pytest.approx((2 / 3 + 0) / 2)
    assert small["prompted"] == pytest.approx((1 + 0.8) / 2)
    assert small["gain"] == pytest.approx(0.9 - 1 / 3)
    assert scores["threshold_cm3"] == 1.0 and scores["target_gain"] == 0.10
    assert scores["met"] is True
    assert scores["largest_lesion_cm3"] == pytest.approx(1.0)


def test_the_target_is_missed_below_the_gain_and_without_small_lesions() -> None:
    unprompted, prompted, targets = _cases()
    # the box gives nothing on the small lesions: gain 0 < 0.10
    same = score_box_prompts(unprompted, unprompted, targets, num_labels=2, voxel_mm3=VOXEL)
    assert same["small_lesions"]["gain"] == 0.0 and same["met"] is False
    # a threshold below every lesion: no small-lesion case, NaN figures, not met
    none = score_box_prompts(
        unprompted, prompted, targets, num_labels=2, voxel_mm3=VOXEL, threshold_cm3=0.001
    )
    assert none["small_lesions"]["cases"] == 0 and np.isnan(none["small_lesions"]["gain"])
    assert none["met"] is False
    with pytest.raises(ValueError, match="one of each per case"):
        score_box_prompts(unprompted[:2], prompted, targets, num_labels=2, voxel_mm3=VOXEL)


def test_prompted_plan_is_the_segmentation_stage_alone_with_a_box_prompt() -> None:
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    plan = validate_plan(prompted_plan(raw))
    assert [s.name for s in plan.stages] == ["segmentation"]
    task = plan.tasks_until(0)["lesion-seg"]
    assert task.prompt == "box" and plan.name.endswith("-box-prompts")
    assert "backbone" in plan.stages[0].trained_components  # from scratch
    with pytest.raises(ValueError, match="no stage after the first adds task 'nope'"):
        prompted_plan(raw, "nope")
