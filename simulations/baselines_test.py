"""Plan transforms and the pooled site of the baselines (``unicon simulate --compare``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.manifest import load_manifest
from simulations.baselines import (
    BaselineError,
    analytic_segmentation_plan,
    parse_methods,
    shared_backbone_plan,
    single_task_plans,
    without_new_inputs_plan,
    write_pooled_site,
)
from simulations.report import MethodResult, comparisons
from simulations.synthetic import make_sites
from tests.conftest import tiny_plan
from unicon_model.schema import validate_plan


def test_naive_and_regularised_plans_train_the_backbone_in_every_stage() -> None:
    raw = tiny_plan()
    naive = validate_plan(shared_backbone_plan(raw, regulariser=None))
    ewc = validate_plan(shared_backbone_plan(raw, regulariser={"kind": "ewc", "weight": 10.0}))
    assert [s.train for s in naive.stages] == [
        ("backbone", "modality/ct", "task/lesion-class"),
        ("backbone", "modality/ct", "task/survival"),
        ("backbone", "modality/ct", "task/lesion-seg"),
        ("backbone", "modality/pet", "task/lesion-seg"),
    ]
    assert all(not s.regularisers for s in naive.stages)
    assert [len(s.regularisers) for s in ewc.stages] == [0, 1, 1, 1]
    assert ewc.stages[1].regularisers[0].kind == "ewc"
    assert naive.name == "tiny-naive" and ewc.name == "tiny-ewc"


def test_no_pet_plan_swaps_the_pet_route_for_a_ct_only_twin() -> None:
    plan = validate_plan(without_new_inputs_plan(tiny_plan()))
    added = plan.stages[3].add_modalities[0]
    assert (added.name, added.input_keys, added.init_from) == ("pet-ablation", ("ct",), "ct")
    assert plan.stages[3].objective_tasks == ("lesion-seg",)
    assert plan.stages[3].trained_components == ("modality/pet-ablation",)
    with pytest.raises(BaselineError, match="no modality with new inputs"):
        without_new_inputs_plan(tiny_plan(stages=tiny_plan()["stages"][:3]))


def test_pooled_site_lists_every_case_with_resolvable_files(tmp_path: Path) -> None:
    folders = [p.parent for p in make_sites(tmp_path / "sites", sites=2, size=16, cases_per_site=6)]
    pooled = write_pooled_site(folders, tmp_path / "pooled")
    manifest = load_manifest(pooled / "manifest.yaml")
    counts = [len(load_manifest(f / "manifest.yaml").cases) for f in folders]
    assert len(manifest.cases) == sum(counts)
    assert all(manifest.resolve(c.images["ct"]).exists() for c in manifest.cases)
    assert {c.split for c in manifest.cases} == {"train", "val", "test"}


def test_parse_methods_names_every_unknown_one() -> None:
    assert parse_methods("local, naive") == ["naive", "local"]
    assert parse_methods("all")[0] == "naive"
    with pytest.raises(BaselineError, match=r"\['fedavg', 'joint'\]"):
        parse_methods("naive,fedavg,joint")


def _result(name: str, tasks: list[str], rows: list[list[float]], **kw: object) -> MethodResult:
    base: dict = dict(
        name=name,
        stages=[f"s{i}" for i in range(len(rows))],
        tasks=tasks,
        R=rows,
        R_per_site={},
        acc=0.0,
        bwt=0.0,
        forgetting=0.0,
        bytes_up={},
        bytes_down={},
        epsilon={},
        wall_s=1.0,
        rounds=[],
    )
    base.update(kw)
    return MethodResult(**base)


def test_comparisons_by_hand() -> None:
    unicon = _result(
        "unicon",
        ["a@ct", "seg@pet"],
        [[0.8, float("nan")], [0.8, 0.6]],
        bwt=0.0,
        R_per_site={"x": [[0.8, float("nan")], [0.8, 0.7]], "y": [[0.7, float("nan")], [0.7, 0.5]]},
    )
    central = _result("centralised", ["a@ct", "seg@pet"], [[0.9, float("nan")], [0.9, 0.75]])
    naive = _result("naive", ["a@ct"], [[0.8], [0.5]], bwt=-0.3)
    no_pet = _result(
        "no-pet",
        ["a@ct", "seg@pet-ablation"],
        [[0.8, float("nan")], [0.8, 0.4]],
        R_per_site={
            "x": [[0.8, float("nan")], [0.8, 0.4]],
            "y": [[0.7, float("nan")], [0.7, 0.45]],
        },
    )
    out = comparisons({"unicon": unicon, "centralised": central, "naive": naive, "no-pet": no_pet})
    assert out["federated_over_centralised"] == pytest.approx({"a@ct": 0.8 / 0.9, "seg@pet": 0.8})
    assert out["bwt_unicon_minus_naive"] == pytest.approx(0.3)
    assert out["pet_gain"]["seg@pet"]["per_site"] == pytest.approx({"x": 0.3, "y": 0.05})
    assert out["pet_gain"]["seg@pet"]["mean"] == pytest.approx(0.175)
    # a route no stage trains (another route serves it) reads no PET: no gain for it
    served = comparisons({"unicon": unicon, "no-pet": no_pet}, served={"seg@pet": "seg@ct"})
    assert served["pet_gain"] == {}


def test_parse_methods_knows_single_task_and_unet() -> None:
    assert parse_methods("unet, single-task") == ["single-task", "unet"]
    assert parse_methods("all")[-3:] == ["single-task", "unet", "analytic-seg"]
    with pytest.raises(BaselineError, match=r"\['single_task'\]"):
        parse_methods("single_task,unet")


def test_single_task_plans_train_each_later_stage_from_scratch_with_its_budget() -> None:
    raw = tiny_plan()
    raw["stages"][2]["regularisers"] = [{"kind": "fedprox", "mu": 0.01}]
    raw["stages"][3]["regularisers"] = [{"kind": "ewc", "weight": 5.0}]
    raw["stages"][3]["local_epochs"] = 3
    raw["stages"][3]["add_modalities"][0]["decoder_lora"] = {"lesion-seg": 4}
    original = validate_plan(raw)
    plans = single_task_plans(raw)
    assert [i for i, _ in plans] == [1, 2, 3]
    for index, single in plans:
        plan = validate_plan(single)
        (stage,) = plan.stages
        source = original.stages[index]
        assert plan.name == f"tiny-single-{index}"
        assert stage.name == source.name
        assert (stage.rounds, stage.local_epochs, stage.batch_size, stage.optimizer) == (
            source.rounds,
            source.local_epochs,
            source.batch_size,
            source.optimizer,
        )
    stages = [validate_plan(p).stages[0] for _, p in plans]
    assert [s.trained_components for s in stages] == [
        ("backbone", "modality/ct", "task/survival"),
        ("backbone", "modality/ct", "task/lesion-seg"),
        ("backbone", "modality/pet", "task/lesion-seg"),
    ]
    pet = stages[2].add_modalities[0]
    assert (pet.name, pet.input_keys, pet.init_from) == ("pet", ("ct", "pet"), None)
    assert pet.decoder_lora == {}  # its stage's own decoder trains in full
    assert [t.name for t in stages[2].add_tasks] == ["lesion-seg"]
    assert [r.kind for r in stages[1].regularisers] == ["fedprox"]
    assert stages[2].regularisers == ()  # EWC refers to earlier stages: dropped
    assert raw["stages"][3]["regularisers"] == [{"kind": "ewc", "weight": 5.0}]  # untouched
    with pytest.raises(BaselineError, match="has one stage"):
        single_task_plans(tiny_plan(stages=tiny_plan()["stages"][:1]))


def test_comparisons_against_unet_and_single_task_by_hand() -> None:
    nan = float("nan")
    unicon = _result("unicon", ["a@ct", "seg@ct"], [[0.8, nan], [0.8, 0.6]])
    unet = _result("unet", ["seg@ct"], [[nan], [0.75]])
    single = _result("single-task", ["a@ct", "seg@ct"], [[nan, nan], [nan, 0.5]])
    out = comparisons({"unicon": unicon, "unet": unet, "single-task": single})
    assert out["unicon_over_unet"] == pytest.approx({"seg@ct": 0.8})
    assert out["unicon_minus_single_task"] == pytest.approx({"seg@ct": 0.1})


def test_unicon_minus_the_best_continual_baseline_by_hand() -> None:
    nan = float("nan")
    unicon = _result("unicon", ["a@ct", "seg@ct"], [[0.8, nan], [0.8, 0.6]])
    naive = _result("naive", ["a@ct", "seg@ct"], [[0.9, nan], [0.7, 0.65]])
    ewc = _result("ewc", ["a@ct", "seg@ct"], [[0.9, nan], [0.85, 0.5]])
    single = _result("single-task", ["seg@ct"], [[nan], [0.7]])
    unet = _result("unet", ["seg@ct"], [[nan], [0.9]])  # not a continual baseline
    out = comparisons(
        {"unicon": unicon, "naive": naive, "ewc": ewc, "single-task": single, "unet": unet}
    )
    best = out["unicon_minus_best_baseline"]
    assert best["a@ct"]["method"] == "ewc" and best["a@ct"]["value"] == pytest.approx(0.85)
    assert best["a@ct"]["difference"] == pytest.approx(-0.05)
    assert best["seg@ct"]["method"] == "single-task"
    assert best["seg@ct"]["difference"] == pytest.approx(-0.1)


def test_the_analytic_seg_variant_fits_the_segmentation_heads_in_one_round() -> None:
    # Prepare: the tiny plan (its PET stage adapts lesion-seg's decoder)
    raw = tiny_plan()
    raw["stages"][3]["add_modalities"][0]["decoder_lora"] = {"lesion-seg": 2}
    raw["stages"][2]["add_tasks"][0]["lora_rank"] = 2
    # Execute
    out = analytic_segmentation_plan(raw)
    plan = validate_plan(out)
    # Assert: the segmentation stage is analytic, with the chosen options, nothing trained
    seg = plan.stages[2]
    (task,) = seg.add_tasks
    assert seg.is_analytic and seg.rounds == 1 and seg.train == ()
    assert task.head == "analytic" and task.analytic_features == ("intensity", "squares")
    assert (task.l2, task.foreground_prior, task.lora_rank) == (0.1, 0.1, 0)
    # the PET stage keeps its objective but drops the decoder deltas of an analytic head
    pet = plan.stages[3]
    assert pet.objective_tasks == ("lesion-seg",) and pet.add_modalities[0].decoder_lora == {}
    assert plan.stages[:2] == validate_plan(raw).stages[:2] and plan.name == "tiny-analytic-seg"
    assert raw["stages"][2]["add_tasks"][0]["lora_rank"] == 2  # the input is not changed
    with pytest.raises(BaselineError, match="adds no neural segmentation task"):
        analytic_segmentation_plan(tiny_plan(stages=tiny_plan()["stages"][:2]))


def test_the_analytic_seg_variant_against_the_best_continual_baseline_by_hand() -> None:
    nan = float("nan")
    unicon = _result("unicon", ["a@ct", "seg@ct"], [[0.8, nan], [0.8, 0.4]])
    variant = _result("analytic-seg", ["a@ct", "seg@ct"], [[0.8, nan], [0.8, 0.55]])
    ewc = _result("ewc", ["a@ct", "seg@ct"], [[0.9, nan], [0.85, 0.5]])
    out = comparisons({"unicon": unicon, "ewc": ewc, "analytic-seg": variant})
    assert out["unicon_minus_best_baseline"]["seg@ct"]["difference"] == pytest.approx(-0.1)
    best = out["analytic_seg_minus_best_baseline"]
    assert best["seg@ct"] == {"method": "ewc", "value": 0.5, "difference": pytest.approx(0.05)}
    assert "analytic-seg" not in {b["method"] for b in out["unicon_minus_best_baseline"].values()}
