"""An analytic (ridge) segmentation stage over three synthetic sites, end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from client.data import build_dataset
from client.manifest import load_manifest
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.analytic import (
    AnalyticSegmentationHead,
    RidgeStatistics,
    merge_statistics,
    segmentation_statistics,
    voxel_class_weights,
)
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]


@pytest.mark.parametrize(
    "extras", [(), ("context", "intensity", "squares")], ids=["pyramid", "voxel-extras"]
)
def test_an_analytic_segmentation_stage_trains_in_one_round_and_equals_the_pooled_solve(
    sites_dir: Path, tmp_path: Path, extras: tuple[str, ...]
) -> None:
    # Prepare: one foundation round, then a per-voxel ridge head on the frozen pyramid
    # (with the parameter-free voxel extras: the input's intensity enters at the sites)
    plan = seg_ridge_plan(analytic_features=extras) if extras else seg_ridge_plan()
    registry = Registry(tmp_path / "registry")
    sites = InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state")
    # Execute
    Coordinator(plan, registry, sites, site_wait=0).run()
    # Assert: one round, a reported condition number, Dice above 0 on the sites' test cases
    rounds = [r for r in registry.metrics(plan.name) if r["kind"] == "round"]
    record = rounds[-1]
    assert record["stage"] == "seg-ridge" and record["round"] == 1
    assert 1 < record["condition"]["lesion-seg"] < 1e12
    dice = registry.results(plan.name)["R"][1]["lesion-seg@ct"]
    assert dice > 0, dice
    # the head equals the ridge solve of the statistics pooled over every site's voxels
    foundation, _ = registry.load("v0001-foundation")
    model, _ = registry.load("v0002-seg-ridge")
    head = model.tasks["lesion-seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    per_site = pooled_statistics(plan, foundation, model, [sites_dir / site for site in SITES])
    pooled = merge_statistics(per_site).solution(l2=0.1, bias_column=True)
    stored_weight = head.weight.double().numpy().T
    difference = float(np.abs(stored_weight - pooled.weight).max())
    assert difference <= 1e-4, difference
    np.testing.assert_allclose(head.bias.double().numpy(), pooled.bias, atol=1e-4)
    # the cumulative statistics are kept with the model version, for a later update
    stored = head.stored_statistics()
    assert stored.count == sum(s.count for s in per_site) > 0
    # (the sites' float32 features differ from these in the last bits: batches differ)
    np.testing.assert_allclose(stored.gram, merge_statistics(per_site).gram, atol=1e-5)


def seg_ridge_plan(analytic_features: tuple[str, ...] = (), **secure: object) -> Plan:
    """One plain foundation round, then an analytic segmentation stage (``secure`` extras,
    ``analytic_features`` of the head)."""
    raw = tiny_plan()
    raw["stages"] = [
        {**raw["stages"][0], "rounds": 1},
        {
            "name": "seg-ridge",
            "add_tasks": [
                {
                    "name": "lesion-seg",
                    "kind": "segmentation",
                    "labels": ["background", "tumour"],
                    "head": "analytic",
                    "analytic_random_features": 8,
                    "foreground_prior": 0.05,
                    "l2": 0.1,
                    **({"analytic_features": list(analytic_features)} if analytic_features else {}),
                }
            ],
            "rounds": 1,
            **secure,
        },
    ]
    return validate_plan(raw)


def pooled_statistics(
    plan: Plan, foundation: UniconModel, model: UniconModel, folders: list[Path]
) -> list[RidgeStatistics]:
    """Each site's statistics of ``lesion-seg``, computed here from its train cases."""
    head = model.tasks["lesion-seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    task = plan.tasks_until(1)["lesion-seg"]
    per_site = []
    for folder in folders:
        data = build_dataset(
            load_manifest(folder / "manifest.yaml"),
            split="train",
            modality=plan.modalities_until(0)["ct"],
            tasks={task.name: task},
            data=plan.data,
        )
        cases = [s for s in data.samples if bool(s["lesion-seg:has"])]
        with torch.no_grad():
            images = torch.stack([s["image"] for s in cases])
            voxels = head.voxel_features(foundation.encode(images, modality="ct"), images)
        masks = torch.stack([s["lesion-seg:mask"] for s in cases])
        weights = voxel_class_weights(2, task.foreground_prior)
        per_site.append(segmentation_statistics(voxels, masks, weights))
    return per_site


def background_only(folder: Path) -> None:
    """Overwrite every lesion mask of the site ``folder``: all its voxels are background."""
    for path in (folder / "seg").glob("*.nii.gz"):
        image = nib.load(path)
        zeros = np.zeros(image.shape, dtype=np.uint8)
        nib.save(nib.Nifti1Image(zeros, image.affine), path)


@pytest.mark.parametrize("single_label_site", [False, True], ids=["mixed", "background-only"])
def test_a_secure_analytic_segmentation_stage_equals_the_pooled_solve(
    sites_dir: Path, tmp_path: Path, single_label_site: bool
) -> None:
    # Prepare: three sites (the last one with only background voxels, if asked), a plain
    # foundation round, then the segmentation ridge head through SecAgg+
    folders = []
    for site in SITES:
        folders.append(tmp_path / "sites" / site)
        shutil.copytree(sites_dir / site, folders[-1])
    if single_label_site:
        background_only(folders[-1])
    # per case, the statistics here stay below 7 (weighted squares of the voxel features)
    plan = seg_ridge_plan(
        min_sites=3,
        secure_aggregation=True,
        secagg={"num_shares": 3, "reconstruction_threshold": 2, "clipping_range": 32.0},
    )
    registry = Registry(tmp_path / "registry")
    transport = InProcessTransport(folders, tmp_path / "site-state")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: the round went through SecAgg+ with all three sites and nothing clipped
    (secure,) = transport.secure_rounds
    assert secure.failed == [] and sorted(secure.num_examples) == [1, 2, 3]
    record = [r for r in registry.metrics(plan.name) if r["kind"] == "round"][-1]
    assert record["stage"] == "seg-ridge" and record["secure"] is True
    assert record["clipped"] == dict.fromkeys(SITES, 0)
    assert 1 < record["condition"]["lesion-seg"] < 1e12
    # the head equals the ridge solve of the statistics pooled over every site's voxels
    foundation, _ = registry.load("v0001-foundation")
    model, _ = registry.load("v0002-seg-ridge")
    head = model.tasks["lesion-seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    per_site = pooled_statistics(plan, foundation, model, folders)
    if single_label_site:
        assert per_site[-1].target_sum[1] == 0 < per_site[0].target_sum[1]
    pooled = merge_statistics(per_site).solution(l2=0.1, bias_column=True)
    difference = float(np.abs(head.weight.double().numpy().T - pooled.weight).max())
    assert difference <= 1e-4, difference
    np.testing.assert_allclose(head.bias.double().numpy(), pooled.bias, atol=1e-4)
    assert float(np.abs(pooled.weight).max()) > 1e-2  # not trivially equal (all zeros)
    # the stored count is exact: whole cases of whole patches, despite the quantisation
    stored = head.stored_statistics()
    assert stored.count == sum(s.count for s in per_site) == record["num_examples"] * 16**3
    np.testing.assert_allclose(stored.gram, merge_statistics(per_site).gram, atol=1e-5)
