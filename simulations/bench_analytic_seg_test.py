"""The analytic-vs-gradient segmentation benchmark's pure pieces: ratio, sizes and plans."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from simulations.bench_analytic_seg import (
    analytic_seg_row,
    branch_plan,
    dice_ratio,
    encoder_plan,
    segmentation_stage,
    statistics_bytes,
)
from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run
from unicon_model.schema import validate_plan

ENCODER = Path("/registry/versions/v0002-classification")


def test_the_ratio_is_analytic_over_gradient_and_met_at_ninety_percent() -> None:
    assert dice_ratio(0.45, 0.5) == {"ratio": pytest.approx(0.9), "target": 0.9, "met": True}
    assert dice_ratio(0.6, 0.5)["met"] is True
    below = dice_ratio(0.44, 0.5)
    assert below["ratio"] == pytest.approx(0.88) and below["met"] is False
    assert dice_ratio(0.3, 0.5, target=0.5)["met"] is True
    for analytic, gradient in ((0.3, 0.0), (math.nan, 0.5), (0.3, math.nan)):
        undefined = dice_ratio(analytic, gradient)
        assert math.isnan(undefined["ratio"]) and undefined["met"] is False


def test_statistics_bytes_are_the_five_float64_arrays_of_each_head() -> None:
    # count, feature sum (d), target sum (k), Gram (d x d), cross (d x k)
    assert statistics_bytes({"seg": (10, 2)}) == 8 * (1 + 10 + 2 + 100 + 20)
    assert statistics_bytes({"a": (3, 2), "b": (1, 1)}) == 8 * (1 + 3 + 2 + 9 + 6) + 8 * 5
    assert statistics_bytes({}) == 0


def test_both_branches_train_only_the_new_task_on_the_same_encoder() -> None:
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    seg = segmentation_stage(raw)
    assert raw["stages"][seg]["name"] == "segmentation"
    encoder = validate_plan(encoder_plan(raw))
    # the stages before segmentation that train the features (prognosis trains its head only)
    assert [s.name for s in encoder.stages] == ["foundation", "classification"]
    assert all("backbone" in s.trained_components for s in encoder.stages)
    analytic = validate_plan(branch_plan(raw, ENCODER, analytic=True))
    gradient = validate_plan(branch_plan(raw, ENCODER, analytic=False))
    assert analytic.name != gradient.name != encoder.name
    for plan in (analytic, gradient):
        (stage,) = plan.stages
        assert [t.name for t in stage.add_tasks] == ["lesion-seg"]
        assert stage.add_modalities == encoder.stages[0].add_modalities
        seed = plan.model.pretrained
        assert seed is not None and Path(seed.path) == ENCODER
        assert seed.components == ("backbone", "modality/ct")
        assert plan.model == analytic.model and plan.data == encoder.data
    (a,), (g,) = analytic.stages, gradient.stages
    # gradient: the plan's segmentation rounds, only the head's parameters trained
    assert g.train == ("task/lesion-seg",) and not g.is_analytic
    assert g.rounds == raw["stages"][seg]["rounds"] and g.add_tasks[0].head == "neural"
    # analytic: one round of statistics, no gradient training at all
    assert a.is_analytic and a.train == () and a.rounds == 1
    assert a.add_tasks[0].head == "analytic" and a.add_tasks[0].class_balance
    options = {"analytic_random_features": 32, "class_balance": False}
    tuned = validate_plan(branch_plan(raw, ENCODER, analytic=True, head_options=options))
    assert tuned.stages[0].add_tasks[0].analytic_random_features == 32
    assert not tuned.stages[0].add_tasks[0].class_balance


def test_a_plan_without_a_later_segmentation_stage_is_refused() -> None:
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    with pytest.raises(ValueError, match="no stage after the first adds task 'nope'"):
        branch_plan(raw, ENCODER, analytic=True, task="nope")
    with pytest.raises(ValueError, match="no stage after the first adds task 'masked-ct'"):
        encoder_plan(raw, "masked-ct")


def test_the_table_row_shows_both_heads_or_why_not() -> None:
    branch = {"route": "lesion-seg@ct", "dice": 0.5, "rounds": 2, "wall_s": 10.0}
    entry = {
        "analytic": {**branch, "rounds": 1, "bytes_up_mean": 1000.0, "statistics_bytes": 900},
        "gradient": {**branch, "bytes_up_mean": 5000.0},
        **dice_ratio(0.5, 0.5),
    }
    title, figure = analytic_seg_row(entry)
    assert "lesion-seg@ct" in title
    assert "×1.000" in figure and "met" in figure and "1 vs 2 rounds" in figure
    assert "statistics 900 B" in figure and "5,000 B" in figure
    assert analytic_seg_row({"error": "boom"})[1] == "not computed: boom"
