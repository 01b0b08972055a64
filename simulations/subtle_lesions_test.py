"""PET gain on subtle lesions: hand-made 8³ sites, stub models, figures computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn

from client.manifest import manifest_yaml
from server.registry import Registry
from simulations.baselines import BaselineError, final_model, without_new_inputs_plan
from simulations.subtle_lesions import (
    RouteModel,
    SubtleLesionError,
    ablated_routes,
    pet_gain_subtle,
    subtle_lesion_gain,
)
from simulations.synthetic import make_sites
from unicon_model.checkpoint import Lineage
from unicon_model.model import UniconModel
from unicon_model.schema import DataSpec, ModalitySpec, TaskSpec, validate_plan

SEG = TaskSpec(name="lesion-seg", kind="segmentation", labels=["background", "tumour"])
PET = ModalitySpec(name="pet", inputs=["ct", "pet"], init_from="ct")
CT_ONLY = ModalitySpec(name="pet-ablation", inputs=["ct"], init_from="ct")
DATA = DataSpec(patch_size=(8, 8, 8))

A = np.s_[1:3, 1:3, 1:3]  # visible on CT (200 HU), hot on PET
B = np.s_[5:7, 5:7, 5:7]  # subtle: 0 HU like the background, hot on PET
C = np.s_[1:3, 5:7, 1:3]  # subtle, and hot on PET on 3 of its 8 voxels only


class Threshold(nn.Module):
    """Predicts lesion where input channel ``channel`` exceeds 0.5 (after preprocessing).

    CT is windowed (-160, 240) HU -> [0, 1]: background 0 HU -> 0.4, lesion A 200 HU -> 0.9.
    PET is SUV / 10: background 1 -> 0.1, hot 8 -> 0.8.
    """

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.channel = channel

    def forward(
        self, x: Tensor, *, modality: str, task: str, clinical: Tensor | None = None
    ) -> Tensor:
        lesion = x[:, self.channel] - 0.5
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))


def _site(root: Path, name: str, cases: dict[str, tuple[list, list, list]], pet: bool) -> Path:
    """A site folder; each case: (visible lesions, subtle lesions, hot PET regions)."""
    folder = root / name
    entries = []
    for case_id, (visible, subtle, hot) in cases.items():
        ct = np.zeros((8, 8, 8), np.float32)
        suv = np.ones((8, 8, 8), np.float32)
        mask = np.zeros((8, 8, 8), np.uint8)
        truth = np.zeros((8, 8, 8), np.uint8)
        for region in visible:
            ct[region], mask[region] = 200.0, 1
        for region in subtle:
            mask[region], truth[region] = 1, 1
        for region in hot:
            suv[region] = 8.0
        images = {"ct": f"ct/{case_id}.nii.gz"}
        _save(ct, folder / images["ct"])
        if pet:
            images["pet"] = f"pet/{case_id}.nii.gz"
            _save(suv, folder / images["pet"])
        _save(mask, folder / "seg" / f"{case_id}.nii.gz")
        _save(truth, folder / "truth" / "subtle" / f"{case_id}.nii.gz")
        entries.append(
            {
                "id": case_id,
                "split": "test",
                "images": images,
                "labels": {"lesion-seg": f"seg/{case_id}.nii.gz"},
            }
        )
    tasks = {"lesion-seg": {"kind": "segmentation", "labels": ["background", "tumour"]}}
    (folder / "manifest.yaml").write_text(
        manifest_yaml({"site": name, "tasks": tasks, "cases": entries})
    )
    return folder


@pytest.fixture
def sites(tmp_path: Path) -> list[Path]:
    three_of_c = [(1, 5, 1), (1, 5, 2), (2, 6, 2)]  # voxels of C
    return [
        _site(tmp_path, "site-a", {"a-1": ([A], [B], [A, B]), "a-2": ([A], [], [A])}, True),
        _site(tmp_path, "site-b", {"b-1": ([], [C], three_of_c)}, True),
        _site(tmp_path, "site-c", {"c-1": ([A], [], [])}, False),  # no PET: not scored
    ]


def _routes() -> tuple[RouteModel, RouteModel]:
    return RouteModel(Threshold(1), PET, SEG), RouteModel(Threshold(0), CT_ONLY, SEG)


def test_figures_by_hand(sites: list[Path]) -> None:
    pet, ablation = _routes()
    out = subtle_lesion_gain(sites, DATA, pet, ablation)
    assert out["routes"] == {"pet": "lesion-seg@pet", "ablation": "lesion-seg@pet-ablation"}
    # a-1: PET finds A and B (Dice 1), CT only A (2·8/(8+16) = 2/3); a-2: both 1;
    # b-1: PET 3 voxels of C (2·3/(3+8) = 6/11), CT nothing (0). Pooled over the 3 cases.
    pooled = out["pooled"]
    assert pooled["pet"]["dice"] == pytest.approx((1 + 1 + 6 / 11) / 3)
    assert pooled["ablation"]["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    # subtle voxels: B 8 + C 8; PET hits 8 + 3
    assert pooled["pet"]["subtle_recall"] == pytest.approx(11 / 16)
    assert pooled["ablation"]["subtle_recall"] == 0.0
    # B detected (8/8), C not (3/8 < 0.5)
    assert pooled["pet"]["subtle_detection"] == pytest.approx(1 / 2)
    assert pooled["ablation"]["subtle_detection"] == 0.0
    assert out["gain"] == pytest.approx(
        {"dice": 28 / 33 - 5 / 9, "subtle_recall": 11 / 16, "subtle_detection": 0.5}
    )
    assert set(out["per_site"]) == {"site-a", "site-b"}  # site-c has no PET
    assert out["per_site"]["site-a"]["ablation"]["dice"] == pytest.approx(5 / 6)
    assert out["per_site"]["site-b"]["pet"]["subtle_recall"] == pytest.approx(3 / 8)
    assert out["gain_per_site"]["site-b"]["subtle_detection"] == 0.0
    assert out["counts"] == {
        "cases": 3,
        "subtle_cases": 2,
        "subtle_lesions": 2,
        "subtle_voxels": 16,
    }


@pytest.mark.parametrize(("overlap", "detected"), [(0.0, 1.0), (3 / 8, 1.0), (0.5, 0.0)])
def test_detection_rule(sites: list[Path], overlap: float, detected: float) -> None:
    """C has 3 of its 8 voxels predicted: detected at an overlap of up to 3/8 only."""
    out = subtle_lesion_gain(sites[1:2], DATA, *_routes(), min_overlap=overlap)
    assert out["pooled"]["pet"]["subtle_detection"] == detected


def test_missing_truth_lists_every_file_and_changes_nothing(sites: list[Path]) -> None:
    gone = [sites[0] / "truth" / "subtle" / "a-2.nii.gz", sites[1] / "truth/subtle/b-1.nii.gz"]
    for path in gone:
        path.unlink()
    before = sorted(p for p in sites[0].parent.rglob("*"))
    with pytest.raises(SubtleLesionError, match="2 test case") as error:
        subtle_lesion_gain(sites, DATA, *_routes())
    assert all(str(p.resolve()) in str(error.value) for p in gone)
    assert "make-data" in str(error.value)
    assert sorted(p for p in sites[0].parent.rglob("*")) == before


def test_bad_arguments(sites: list[Path]) -> None:
    pet, ablation = _routes()
    other = RouteModel(
        Threshold(0), CT_ONLY, TaskSpec(name="other", kind="segmentation", labels=["bg", "x"])
    )
    with pytest.raises(SubtleLesionError, match="different tasks"):
        subtle_lesion_gain(sites, DATA, pet, other)
    with pytest.raises(SubtleLesionError, match="min_overlap"):
        subtle_lesion_gain(sites, DATA, pet, ablation, min_overlap=1.5)
    with pytest.raises(SubtleLesionError, match="no site has a test case"):
        subtle_lesion_gain(sites[2:], DATA, pet, ablation)


def _plan() -> dict:
    return {
        "name": "tiny",
        "model": {"spatial_dims": 3, "widths": [4, 8], "adapter_rank": 2, "head_hidden": 8},
        "data": {"patch_size": [8, 8, 8]},
        "stages": [
            {
                "name": "seg",
                "add_modalities": [{"name": "ct"}],
                "add_tasks": [
                    {"name": "lesion-seg", "kind": "segmentation", "labels": ["bg", "lesion"]}
                ],
                "train": ["backbone", "modality/ct", "task/lesion-seg"],
            },
            {
                "name": "pet",
                "objectives": ["lesion-seg"],
                "add_modalities": [{"name": "pet", "inputs": ["ct", "pet"], "init_from": "ct"}],
            },
        ],
    }


def test_routes_of_a_plan_and_a_model() -> None:
    raw = _plan()
    assert ablated_routes(raw) == [("lesion-seg@pet", "lesion-seg@pet-ablation")]
    model = UniconModel.from_plan(validate_plan(without_new_inputs_plan(raw)))
    route = RouteModel.of(model, "lesion-seg@pet-ablation")
    assert route.modality.input_keys == ("ct",) and route.route == "lesion-seg@pet-ablation"
    with pytest.raises(SubtleLesionError, match=r"no modality 'pet'.*'pet-ablation'"):
        RouteModel.of(model, "lesion-seg@pet")
    with pytest.raises(SubtleLesionError, match=r"no modality 'mr'.*no task 'survival'"):
        RouteModel.of(model, "survival@mr")
    with pytest.raises(SubtleLesionError, match="task@modality"):
        RouteModel.of(model, "lesion-seg")


def test_generator_records_subtle_voxels_outside_the_manifest(tmp_path: Path) -> None:
    (manifest,) = make_sites(
        tmp_path, sites=1, seed=0, size=16, cases_per_site=8, unlabelled_per_site=1
    )
    folder = manifest.parent
    cases = yaml.safe_load(manifest.read_text())["cases"]
    assert "truth" not in manifest.read_text()
    labelled = [c["id"] for c in cases if "labels" in c]
    written = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "truth/subtle").iterdir())
    assert written == sorted(labelled)  # every labelled case, no unlabelled one
    with_subtle = []
    for case_id in labelled:
        subtle = np.asarray(nib.load(folder / f"truth/subtle/{case_id}.nii.gz").dataobj)
        lesion = np.asarray(nib.load(folder / f"seg/{case_id}.nii.gz").dataobj)
        assert subtle.dtype == np.uint8 and set(np.unique(subtle)) <= {0, 1}
        assert not (subtle & (1 - lesion)).any()  # subtle voxels are lesion voxels
        if subtle.any():
            with_subtle.append(case_id)
    assert with_subtle  # a quarter of the lesions are subtle: seed 0 has some
    assert json.loads((folder / "truth.json").read_text())["subtle_cases"] == with_subtle


def _complete(registry: Registry, raw: dict) -> UniconModel:
    """Commit and complete every stage of ``raw`` (untrained models); return the last."""
    plan = validate_plan(raw)
    models = [UniconModel.from_plan(plan, through_stage=i) for i in range(len(plan.stages))]
    for stage, model in zip(plan.stages, models, strict=True):
        version = registry.commit(model, lineage=Lineage(plan=plan.name, stage=stage.name))
        registry.complete_stage(plan.name, stage.name, version)
    return models[-1]


def test_final_model_is_the_last_completed_stage(tmp_path: Path) -> None:
    root = tmp_path / "no-pet" / "registry"
    with pytest.raises(BaselineError, match="no registry"):
        final_model(root, "tiny-no-pet")
    assert not (tmp_path / "no-pet").exists()  # nothing created
    plan = validate_plan(without_new_inputs_plan(_plan()))
    registry = Registry(root)
    with pytest.raises(BaselineError, match="'tiny-no-pet' completed no stage"):
        final_model(root, "tiny-no-pet")
    torch.manual_seed(0)
    last = _complete(registry, without_new_inputs_plan(_plan()))
    loaded = final_model(root, plan.name)
    assert "pet-ablation" in loaded.modality_specs
    assert all(torch.equal(v, last.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_pet_gain_subtle_of_a_plan_with_real_models(sites: list[Path]) -> None:
    raw = _plan()
    torch.manual_seed(0)
    with_pet = UniconModel.from_plan(validate_plan(raw))
    without = UniconModel.from_plan(validate_plan(without_new_inputs_plan(raw)))
    out = pet_gain_subtle(raw, sites[1:], with_pet, without)  # site-b; site-c has no PET
    assert list(out) == ["lesion-seg@pet"]
    report = out["lesion-seg@pet"]
    assert report["routes"]["ablation"] == "lesion-seg@pet-ablation"
    assert report["counts"] == {
        "cases": 1,
        "subtle_cases": 1,
        "subtle_lesions": 1,
        "subtle_voxels": 8,
    }
    for figures in report["pooled"].values():
        assert all(0.0 <= v <= 1.0 for v in figures.values())
    ct_only = {**raw, "stages": raw["stages"][:1]}
    with pytest.raises(SubtleLesionError, match="no modality with new inputs"):
        pet_gain_subtle(ct_only, sites, with_pet, without)


def test_bench_reports_the_subtle_gain_from_the_runs_registries(
    sites: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from simulations import bench

    raw = _plan()
    work = tmp_path / "work"
    shown = Console(record=True, width=400)
    monkeypatch.setattr(bench, "console", shown)
    missing = bench._subtle_gain(raw, sites[1:], work)  # nothing ran: an error, not a crash
    assert "no registry" in missing["error"]
    torch.manual_seed(0)
    _complete(Registry(work / "unicon" / "registry"), raw)
    _complete(Registry(work / "no-pet" / "registry"), without_new_inputs_plan(raw))
    subtle = bench._subtle_gain(raw, sites[1:], work)
    assert subtle["lesion-seg@pet"]["counts"]["subtle_lesions"] == 1
    learning = {
        "scenario": "tiny",
        "bwt": {"unicon": 0.0, "naive": 0.0},
        "forgetting": {"unicon": 0.0, "naive": 0.0},
        "federated_over_centralised": {},
        "dp_utility": {},
    }
    bench._print_learning({**learning, "pet_gain_subtle": subtle})
    bench._print_learning({**learning, "pet_gain_subtle": missing})
    text = shown.export_text()
    assert "PET gain on lesions barely visible on CT, lesion-seg@pet" in text
    assert "1 lesions in 1 of 1 test cases" in text
    assert "not computed" in text and "no registry" in text
