"""The new-structures benchmark: its Dice changes by hand, its plans, and one tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from simulations.bench_structures import (
    LESION_TASK,
    ORGAN_TASK,
    analytic_plan,
    bench_new_structures,
    label_changes,
    new_structures_row,
    pooled_label_dice,
    structures_plan,
)
from simulations.synthetic import ORGANS, TASKS
from tests.conftest import TINY_MODEL
from tests.conftest import sites_dir as sites_dir  # the session's tiny hospitals
from unicon_model.schema import validate_plan
from unicon_model.schema.validate import plan_warnings

NAN = math.nan
LABELS = ["liver", "lungs", "spine"]


def test_pooled_label_dice_is_each_labels_mean_over_the_cases_that_have_it() -> None:
    per_case = torch.tensor([[0.5, NAN, 1.0], [0.7, 0.2, NAN], [0.9, 0.4, NAN]])
    pooled = pooled_label_dice(per_case, LABELS)
    assert pooled == pytest.approx({"liver": 0.7, "lungs": 0.3, "spine": 1.0})
    nobody = pooled_label_dice(torch.tensor([[0.5, NAN, NAN]]), LABELS)
    assert math.isnan(nobody["lungs"]) and nobody["liver"] == 0.5
    with pytest.raises(ValueError, match="expected \\(cases, 3\\)"):
        pooled_label_dice(torch.zeros(2, 2), LABELS)


def test_label_changes_by_hand() -> None:
    before = {"liver": 0.80, "lungs": 0.60, "spine": 0.50}
    after = {"liver": 0.803, "lungs": 0.594, "spine": 0.50}
    moved = label_changes(before, after)
    assert moved["change"] == pytest.approx({"liver": 0.003, "lungs": -0.006, "spine": 0.0})
    assert moved["max_abs_change"] == pytest.approx(0.006)
    assert moved["met"] is False and moved["exact"] is False and moved["target"] == 0.005
    assert label_changes(before, after, target=0.01)["met"] is True
    same = label_changes(before, dict(before))
    assert same["max_abs_change"] == 0.0 and same["exact"] is True and same["met"] is True
    # a label no test case has: its change and the largest one are unknown, not met
    unknown = label_changes({**before, "spine": NAN}, {**before, "spine": NAN})
    assert math.isnan(unknown["change"]["spine"]) and math.isnan(unknown["max_abs_change"])
    assert unknown["met"] is False and unknown["exact"] is False
    with pytest.raises(ValueError, match="labels differ"):
        label_changes(before, {"liver": 0.8})


def test_the_plans_are_the_example_sized_and_its_analytic_variant(tmp_path: Path) -> None:
    raw = structures_plan(patch_size=16, rounds=1, local_epochs=1, model=TINY_MODEL)
    plan = validate_plan(raw)
    assert list(plan.data.patch_size) == [16, 16, 16]
    assert [s.rounds for s in plan.stages] == [1, 1]
    organ = plan.tasks_until(0)[ORGAN_TASK]
    assert list(organ.labels[1:]) == sorted(ORGANS, key=ORGANS.__getitem__) == LABELS
    assert list(organ.labels) == TASKS[ORGAN_TASK]["labels"]
    example = validate_plan(structures_plan())
    assert [s.rounds for s in example.stages] == [4, 4]  # the example's own
    analytic = validate_plan(analytic_plan(structures_plan(patch_size=16), tmp_path / "v0001"))
    first = analytic.stages[0]
    assert first.is_analytic and first.rounds == 1 and not first.train
    assert analytic.tasks_until(0)[ORGAN_TASK].head == "analytic"
    assert analytic.model.pretrained is not None
    assert analytic.model.pretrained.components == ("backbone", "modality/ct")
    assert LESION_TASK in analytic.tasks_until(1) and analytic.name.endswith("-analytic")
    assert plan_warnings(analytic) == []  # the encoder is seeded, not random


def test_a_lesion_stage_leaves_every_organ_labels_dice_exactly_unchanged(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the example on the tiny model, one round of one epoch per stage
    raw = structures_plan(patch_size=16, model=TINY_MODEL, rounds=1, local_epochs=1)
    sites = [sites_dir / s for s in ("hospital-a", "hospital-b", "hospital-c")]
    # Execute
    result = bench_new_structures(raw, sites, tmp_path)
    # Assert: both variants, every earlier label scored, its Dice exactly unchanged
    assert result["labels"] == LABELS
    for name in ("gradient", "analytic"):
        variant = result[name]
        assert variant["identical_predictions"] is True
        assert variant["exact"] is True and variant["max_abs_change"] == 0.0
        assert variant["change"] == {label: 0.0 for label in LABELS}
        assert all(math.isfinite(d) for d in variant["dice_after_organs"].values())
        assert math.isfinite(variant["lesion_dice"]) and variant["test_cases"] >= 6
        route = variant["organ_route"]
        rows = variant["coordinator_R"]
        assert len(rows) == 2 and rows[1][route] == rows[0][route]
        assert list(variant["stage_s"]) == ["organs", "lesions"]
    assert result["met"] is True
    _, figure = new_structures_row(result)
    assert "max |Δ| 0.00e+00 (exact)" in figure and figure.endswith(": met")
