"""A self-supervised foundation stage: plan checks, unlabelled cases, and a federated run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.data import build_dataset
from client.manifest import load_manifest
from client.manifest_check import check_manifest
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.synthetic import make_sites
from tests.conftest import TINY_MODEL
from unicon_model.components import split_by_component
from unicon_model.errors import PlanError
from unicon_model.model import UniconModel
from unicon_model.schema import TaskSpec, validate_plan

RECON = {"name": "masked-ct", "kind": "reconstruction", "mask_ratio": 0.5, "mask_size": 4}
CLASSES = {"name": "lesion-class", "kind": "classification", "classes": ["benign", "malignant"]}


@pytest.fixture(scope="module")
def archive_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three tiny sites, each with 3 unlabelled train cases besides ~16 labelled ones."""
    out = tmp_path_factory.mktemp("archive")
    manifests = make_sites(
        out, sites=3, seed=3, size=16, cases_per_site=16, pet_sites=0, unlabelled_per_site=3
    )
    return [m.parent for m in manifests]


def _plan(**stage: Any) -> dict[str, Any]:
    return {
        "name": "ssl",
        "model": TINY_MODEL,
        "data": {"patch_size": [16, 16, 16]},
        "stages": [
            {
                "name": "pretrain",
                "add_modalities": [{"name": "ct"}],
                "add_tasks": [RECON],
                "train": ["backbone", "modality/ct", "task/masked-ct"],
                "rounds": 2,
                "batch_size": 4,
                "optimizer": {"name": "adam", "lr": 0.01},
                **stage,
            },
            {"name": "classify", "add_tasks": [{**CLASSES, "head": "analytic"}], "rounds": 1},
        ],
    }


def test_plan_check_lists_every_self_supervised_problem_with_its_field_path() -> None:
    raw = _plan(train=["task/masked-ct"])
    raw["stages"][0]["add_tasks"] = [{**RECON, "mask_size": 5, "channels": 2}]
    raw["stages"][1]["add_tasks"] = [{**CLASSES, "head": "analytic", "mask_ratio": 0.3}]
    with pytest.raises(PlanError) as error:
        validate_plan(raw)
    text = str(error.value)
    assert "stages[0].add_tasks[0].mask_size: blocks of 5 voxels do not tile the patch" in text
    assert "stages[0].add_tasks[0].channels: 2 channel(s) to reconstruct" in text
    assert "stages[0].train: the self-supervised task(s) ['masked-ct'] train only their" in text
    assert "`mask_ratio` is only for reconstruction tasks, not classification" in text
    assert "4 problem(s)" in text


def test_unlabelled_cases_are_loaded_for_a_self_supervised_task_only(
    archive_sites: list[Path],
) -> None:
    # Prepare
    site = archive_sites[0]
    manifest = load_manifest(site / "manifest.yaml")
    plan = validate_plan(_plan())
    ct = plan.modalities_until(0)["ct"]
    recon = plan.tasks_until(0)["masked-ct"]
    labelled_train = len(manifest.cases_with(task="lesion-class", split="train"))
    # Execute
    with_ssl = build_dataset(
        manifest, split="train", modality=ct, tasks={"masked-ct": recon}, data=plan.data
    )
    supervised = build_dataset(
        manifest,
        split="train",
        modality=ct,
        tasks={"lesion-class": TaskSpec(**CLASSES)},
        data=plan.data,
    )
    # Assert: the 3 archive cases count for reconstruction, not for classification
    assert manifest.counts()["unlabelled"] == {"train": 3, "val": 0, "test": 0}
    assert len(with_ssl) == labelled_train + 3 == with_ssl.count_labelled("masked-ct")
    assert len(supervised) == labelled_train
    assert not any(cid.endswith(("u000", "u001", "u002")) for cid in supervised.case_ids)
    # and `site check` reports them
    report = check_manifest(site / "manifest.yaml")
    assert report.counts["unlabelled"]["train"] == 3


def test_a_secure_self_supervised_stage_trains_the_encoder_on_every_case_and_stays_out_of_r(
    archive_sites: list[Path], tmp_path: Path
) -> None:
    # Prepare: pretraining under SecAgg+ over 3 sites, then an analytic head on its encoder
    raw = _plan(
        secure_aggregation=True,
        min_sites=3,
        secagg={"num_shares": 3, "reconstruction_threshold": 2},
    )
    plan = validate_plan(raw)
    registry = Registry(tmp_path / "registry")
    transport = InProcessTransport(archive_sites, tmp_path / "site-state")
    initial = UniconModel.from_plan(plan, through_stage=0).state_dict()
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: each round was validated by PSNR on the val splits
    rounds = [r for r in registry.metrics(plan.name) if r.get("kind") == "round"]
    pretrain = [r for r in rounds if r["stage"] == "pretrain"]
    assert len(pretrain) == 2
    scores = [r["val_score"] for r in pretrain]
    assert all(isinstance(s, float) and 0 < s < 100 for s in scores)
    assert set(pretrain[0]["val"]["case_weighted_mean"]) == {"masked-ct@ct"}
    # every train case took part, the unlabelled ones too (labelled train cases + 3)
    manifests = [load_manifest(s / "manifest.yaml") for s in archive_sites]
    expected = sum(m.counts()["cases"]["train"] for m in manifests)
    assert pretrain[0]["num_examples"] == expected
    # the encoder moved; the reconstruction never entered R, the classifier did
    versions = registry.versions()
    trained, _ = registry.load(versions[0])
    state = trained.state_dict()
    moved = [
        k for k in split_by_component(state)["backbone"] if not torch.equal(state[k], initial[k])
    ]
    assert moved
    results = registry.results(plan.name)
    assert results["R"][0] == {}
    assert set(results["R"][1]) == {"lesion-class@ct"}
