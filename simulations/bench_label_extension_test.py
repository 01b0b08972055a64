"""The new-labels benchmark: its plans, its pooled Dice by hand, and one tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations.bench_label_extension import (
    _pooled,
    analytic_extension_plan,
    bench_label_extension,
    joint_plan,
    label_extension_plan,
    label_extension_row,
)
from tests.conftest import TINY_MODEL
from tests.conftest import sites_dir as sites_dir  # the session's tiny hospitals
from unicon_model.schema import validate_plan

LABELS = ("background", "liver", "lungs", "spine")


def test_the_plans_are_the_example_its_analytic_extension_and_the_joint_reference() -> None:
    raw = label_extension_plan(patch_size=16, model=TINY_MODEL, rounds=1, local_epochs=1)
    plan = validate_plan(raw)
    assert list(plan.data.patch_size) == [16, 16, 16] and [s.rounds for s in plan.stages] == [1, 1]
    extension = plan.tasks_until(1)["organ-spine"]
    assert extension.extends == "organ-seg" and extension.labels == ("background", "spine")
    assert [s.rounds for s in validate_plan(label_extension_plan()).stages] == [4, 4]
    analytic = validate_plan(analytic_extension_plan(label_extension_plan()))
    fitted = analytic.tasks_until(1)["organ-spine"]
    assert fitted.head == "analytic" and fitted.lora_rank == 0
    assert fitted.analytic_features == ("intensity", "squares") and fitted.l2 == 0.1
    assert analytic.stages[1].rounds == 1 and not analytic.stages[1].train
    joint = validate_plan(joint_plan(label_extension_plan()))
    assert len(joint.stages) == 1 and joint.tasks_until(0)["organ-seg"].labels == LABELS
    assert joint.tasks_until(0)["organ-seg"].foreground_prior == pytest.approx(0.15)


def test_pooled_dice_is_each_labels_mean_over_the_cases_that_have_it() -> None:
    # two 1x4 cases; case 0 has liver and spine, case 1 liver and lungs
    target = torch.tensor([[[1, 1, 3, 0]], [[1, 2, 2, 0]]])
    pred = np.array([[[1, 0, 3, 3]], [[1, 2, 0, 0]]])
    dice = _pooled(pred, target, LABELS, ["liver", "lungs", "spine"])
    # liver: case 0 2*1/(1+2) = 2/3, case 1 1; lungs: case 1 only 2*1/(1+2); spine case 0 2/3
    assert dice == pytest.approx({"liver": (2 / 3 + 1) / 2, "lungs": 2 / 3, "spine": 2 / 3})


def test_adding_the_spine_leaves_the_liver_and_lungs_exactly_and_scores_every_label(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the example on the tiny model, one round of one epoch per stage
    raw = label_extension_plan(patch_size=16, model=TINY_MODEL, rounds=1, local_epochs=1)
    sites = [sites_dir / s for s in ("hospital-a", "hospital-b", "hospital-c")]
    # Execute
    result = bench_label_extension(raw, sites, tmp_path)
    # Assert: both extensions leave the earlier labels bit-identical and score the spine
    assert result["labels"] == {"earlier": ["liver", "lungs"], "added": ["spine"]}
    for name in ("gradient", "analytic"):
        variant = result[name]
        assert variant["exact"] is True and variant["max_abs_change"] == 0.0
        assert variant["earlier_voxels_identical"] is True
        before, after = variant["dice_per_stage"]
        assert list(before) == ["liver", "lungs"] and list(after) == ["liver", "lungs", "spine"]
        assert all(math.isfinite(d) for d in after.values())
        assert list(variant["new_labels"]) == ["spine"] and variant["test_cases"] >= 6
        assert list(variant["stage_s"]) == ["organs", "spine"]
    # Assert: the joint reference learns all three labels in one stage
    (joint,) = result["joint"]["dice_per_stage"]
    assert list(joint) == ["liver", "lungs", "spine"]
    assert result["met"] is True
    _, figure = label_extension_row(result)
    assert figure.count("max |Δ| 0.00e+00 (exact)") == 2 and figure.endswith(": met")
