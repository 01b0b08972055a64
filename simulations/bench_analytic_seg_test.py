"""The analytic-vs-gradient segmentation benchmark's pure pieces: ratio, sizes, plans and the
choice of the analytic head's options on the val Dice."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from simulations import bench_analytic_seg as bench_module
from simulations.bench_analytic_seg import (
    analytic_seg_row,
    bench_analytic_seg,
    branch_plan,
    dice_ratio,
    encoder_plan,
    segmentation_stage,
    statistics_bytes,
)
from simulations.bench_analytic_select import (
    CANDIDATE_FEATURES,
    CANDIDATE_L2,
    CANDIDATE_PRIORS,
    candidate_grid,
    candidate_name,
    options_text,
    select_candidate,
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
    # the stages before segmentation that train the features: only the foundation (the
    # task stages train their heads and their own encoder deltas)
    assert [s.name for s in encoder.stages] == ["foundation"]
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
    # the gradient head keeps the task's encoder deltas; the analytic one cannot have them
    assert g.add_tasks[0].lora_rank == raw["stages"][seg]["add_tasks"][0]["lora_rank"] > 0
    assert a.add_tasks[0].lora_rank == 0
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


def test_the_candidate_with_the_highest_val_dice_is_chosen() -> None:
    rows = [{"val_dice": 0.2, "dice": 0.9}, {"val_dice": 0.4, "dice": 0.1}, {"val_dice": 0.3}]
    assert select_candidate(rows) == 1  # val decides, never the test Dice
    # a tie goes to the earliest row (grid order: fewer random features, smaller prior)
    assert select_candidate([{"val_dice": 0.1}, {"val_dice": 0.5}, {"val_dice": 0.5}]) == 1


def test_a_candidate_without_a_finite_val_dice_is_never_chosen() -> None:
    rows: list[dict[str, Any]] = [
        {"val_dice": math.nan, "dice": 0.9},
        {"dice": 0.8},
        {"val_dice": None},
        {"val_dice": math.inf},
        {"val_dice": 0.0, "dice": 0.1},
        {"val_dice": True},
    ]
    assert select_candidate(rows) == 4
    assert select_candidate(rows[:4]) is None
    assert select_candidate([]) is None
    assert select_candidate([{"score": 0.1}, {"score": 0.3}], key="score") == 1


def test_the_grid_crosses_priors_and_random_features_fewer_features_first() -> None:
    grid = candidate_grid((0.02, 0.1), (0, 64))
    assert [(c["analytic_random_features"], c["foreground_prior"]) for c in grid] == [
        (0, 0.02),
        (0, 0.1),
        (64, 0.02),
        (64, 0.1),
    ]
    assert all(c["class_balance"] for c in grid)
    assert candidate_name(grid[2]) == "seg-analytic-p0.02-rf64"


def test_the_bench_grid_crosses_voxel_features_penalties_and_priors() -> None:
    grid = candidate_grid(features=CANDIDATE_FEATURES, l2=CANDIDATE_L2)
    assert len(grid) == len(CANDIDATE_FEATURES) * len(CANDIDATE_L2) * len(CANDIDATE_PRIORS) == 12
    # fewer features first, then the default penalty, then the prior
    assert [
        (tuple(c.get("analytic_features", ())), c.get("l2", 1.0), c["foreground_prior"])
        for c in grid[:4]
    ] == [((), 1.0, 0.05), ((), 1.0, 0.1), ((), 1.0, 0.2), ((), 0.1, 0.05)]
    assert grid[-1]["analytic_features"] == ["intensity", "squares"] and grid[-1]["l2"] == 0.1
    names = [candidate_name(c) for c in grid]
    assert len(set(names)) == len(names)
    assert names[0] == "seg-analytic-p0.05-rf0"  # the task's defaults add nothing to a name
    assert names[-1] == "seg-analytic-p0.2-rf0-l2_0.1-fis"
    assert options_text(grid[-1]) == "prior 0.2, 0 RF, l2 0.1, intensity+squares"
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    for options in grid:
        plan = validate_plan(branch_plan(raw, ENCODER, analytic=True, head_options=options))
        spec = plan.stages[0].add_tasks[0]
        assert spec.class_balance
        assert spec.foreground_prior == options["foreground_prior"]
        assert spec.l2 == options.get("l2", 1.0)
        assert list(spec.analytic_features) == options.get("analytic_features", [])


def test_the_analytic_figure_is_the_val_chosen_candidates_test_dice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # val and test disagree on purpose: prior 0.05 has the best val, prior 0.1 the best test
    val = {"seg-analytic-p0.05-rf0": 0.40, "seg-analytic-p0.1-rf0": 0.30}
    test = {"seg-analytic-p0.05-rf0": 0.33, "seg-analytic-p0.1-rf0": 0.38}
    branch = {"route": "lesion-seg@ct", "rounds": 1, "wall_s": 1.0, "bytes_up_mean": 10.0}

    def candidate(name: str, *_: Any) -> dict[str, Any]:
        return {**branch, "dice": test[name], "val_dice": val[name], "val_s": 0.5,
                "statistics_bytes": 7, "statistics_shape": [1, 2]}  # fmt: skip

    def gradient(name: str, *_: Any) -> dict[str, Any]:
        assert name == "seg-gradient"
        return {**branch, "dice": 0.44, "val_dice": math.nan, "rounds": 2}

    monkeypatch.setattr(bench_module, "_candidate", candidate)
    monkeypatch.setattr(bench_module, "_branch", gradient)
    monkeypatch.setattr(bench_module, "_frozen_change", lambda *_: 0.0)
    incremental = {"max_abs_difference": 2e-6, "target": 1e-4, "met": True, "stages": 3,
                   "dice": 0.33, "reference_dice": 0.33}  # fmt: skip
    monkeypatch.setattr(
        "simulations.bench_analytic_incremental.bench_incremental", lambda *_: incremental
    )
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    entry = bench_analytic_seg(
        raw, [], Path("/nowhere"), encoder=ENCODER, candidates=candidate_grid((0.05, 0.1), (0,))
    )
    assert entry["selected"] == "seg-analytic-p0.05-rf0" and entry["selected_by"] == "val_dice"
    assert entry["analytic"]["dice"] == 0.33 and entry["analytic"]["val_dice"] == 0.40
    assert entry["head_options"]["foreground_prior"] == 0.05
    assert entry["ratio"] == pytest.approx(0.33 / 0.44) and entry["gradient"]["dice"] == 0.44
    assert [(c["val_dice"], c["dice"]) for c in entry["grid"]] == [(0.40, 0.33), (0.30, 0.38)]
    title, figure = analytic_seg_row(entry)
    assert (
        title.endswith("lesion-seg@ct")
        and "Dice 0.330 vs 0.440" in figure
        and "statistics 7 B" in figure
    )
    assert "chosen on val: prior 0.05, 0 RF (val Dice 0.400)" in figure
    assert "prior 0.1, 0 RF 0.300/0.380" in figure
    assert (
        "one hospital per stage (3 stages, update_analytic) vs one stage: max |Δw| 2.0e-06"
        in figure
    )
    val["seg-analytic-p0.05-rf0"] = val["seg-analytic-p0.1-rf0"] = math.nan
    with pytest.raises(ValueError, match="no analytic head candidate has a finite val Dice"):
        bench_analytic_seg(raw, [], Path("/nowhere"), encoder=ENCODER,
                           candidates=candidate_grid((0.05, 0.1), (0,)))  # fmt: skip
    with pytest.raises(ValueError, match="no analytic head candidates"):
        bench_analytic_seg(raw, [], Path("/nowhere"), encoder=ENCODER, candidates=[])


def test_the_branches_pin_the_encoder_weights_so_their_runs_repeat(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from server.coordinator import plan_digest

    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)
    weights = {"backbone.w": torch.arange(4.0), "modalities.ct.v": torch.ones(2)}
    digests, pins = [], []
    for run in ("a", "b"):  # the same weights in two registries
        folder = tmp_path / run / "registry" / "versions" / "v0002"
        folder.mkdir(parents=True)
        save_file({"backbone.w": weights["backbone.w"]}, str(folder / "backbone.safetensors"))
        save_file({"modalities.ct.v": weights["modalities.ct.v"]},
                  str(folder / "modality--ct.safetensors"))  # fmt: skip
        plan = branch_plan(raw, folder, analytic=False)
        spec = plan["model"]["pretrained"]
        assert spec["format"] == "safetensors" and spec["components"] == ["backbone", "modality/ct"]
        assert Path(spec["path"]) == tmp_path / run / "v0002-encoder.safetensors"
        assert {k: v.tolist() for k, v in load_file(spec["path"]).items()} == {
            k: v.tolist() for k, v in weights.items()
        }
        pins.append(spec["sha256"])
        digests.append(plan_digest(validate_plan(plan)))
    assert pins[0] == pins[1] and digests[0] == digests[1]  # the same weights: the same run
    unpinned = branch_plan(raw, ENCODER, analytic=False)["model"]["pretrained"]
    assert unpinned["format"] == "unicon" and "sha256" not in unpinned
