"""Labels added to an existing segmentation task (issue 13, item 3), end to end.

Runs ``examples/plans/organ_labels_added.toml`` (liver and lungs, then the spine added to the
same task as a label extension), shrunk to the tiny model, 16³ patches and one round per stage,
in process over the session's synthetic sites, with the extension trained by gradient and,
in a second run, fitted analytically. In both, every liver and lung voxel of the merged map is
predicted exactly as after the organ stage, so those labels' Dice per case is bit-identical,
while the spine comes from the new component only.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.data import build_dataset
from client.label_maps import predict_merged
from client.manifest import load_manifest
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.synthetic import ORGANS
from tests.conftest import TINY_MODEL
from unicon_model.label_extensions import merged_labels
from unicon_model.metrics.segmentation import dice_per_case
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plans" / "organ_labels_added.toml"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
ORGAN, SPINE = "organ-seg", "organ-spine"


def tiny_plan(*, analytic: bool) -> Plan:
    """The example on the tiny model, 16³, one round of one epoch per stage."""
    raw: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    raw["model"] = dict(TINY_MODEL)
    raw["data"]["patch_size"] = [16, 16, 16]
    for stage in raw["stages"]:
        stage.update(rounds=1, local_epochs=1)
    if analytic:
        extension = raw["stages"][1]["add_tasks"][0]
        extension.update(head="analytic", lora_rank=0)
        raw["stages"][1]["train"] = []
        raw["name"] = "organ-labels-added-analytic"
    return validate_plan(raw)


def merged_outputs(
    model: UniconModel, plan: Plan, sites_dir: Path
) -> tuple[np.ndarray, torch.Tensor, tuple[str, ...]]:
    """Merged organ label maps on every site's test cases, targets with all four labels."""
    labels = merged_labels(model.task_specs, ORGAN)
    full = plan.tasks_until(0)[ORGAN].model_copy(
        update={"labels": ("background", *sorted(ORGANS, key=ORGANS.__getitem__))}
    )
    outputs, targets = [], []
    for site in SITES:
        manifest = load_manifest(sites_dir / site / "manifest.yaml")
        dataset = build_dataset(
            manifest,
            split="test",
            modality=plan.stages[0].add_modalities[0],
            tasks={ORGAN: full},
            data=plan.data,
        )
        out, target = predict_merged(model, dataset, ORGAN)
        outputs.append(out)
        targets.append(target)
    return np.concatenate(outputs), torch.cat(targets), labels


@pytest.mark.parametrize("analytic", [False, True], ids=["gradient", "analytic"])
def test_adding_the_spine_to_organ_seg_leaves_liver_and_lung_voxels_unchanged(
    sites_dir: Path, tmp_path: Path, analytic: bool
) -> None:
    # Prepare
    plan = tiny_plan(analytic=analytic)
    registry = Registry(tmp_path / "registry")
    sites = InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state")
    # Execute
    progress = Coordinator(plan, registry, sites, site_wait=0).run()
    organs, _ = registry.load("v0001-organs")
    spine, _ = registry.load("v0002-spine")
    before, target, labels_before = merged_outputs(organs, plan, sites_dir)
    after, target_again, labels_after = merged_outputs(spine, plan, sites_dir)
    # Assert: the spine stage added its own component; the merged map names every label
    assert progress.completed_stages == ["organs", "spine"]
    assert spine.component_names[-2:] == [f"task/{ORGAN}", f"task/{SPINE}"]
    assert labels_before == ("background", "liver", "lungs")
    assert labels_after == ("background", "liver", "lungs", "spine")
    assert torch.equal(target, target_again) and len(before) >= len(SITES) * 2
    # Assert: liver and lung voxels exactly as before; the spine only claims background
    assert set(np.unique(before)) <= {0, 1, 2}
    organ_voxels = before > 0
    np.testing.assert_array_equal(after[organ_voxels], before[organ_voxels])
    assert set(np.unique(after[~organ_voxels])) <= {0, 3}
    # Assert: so the earlier labels' Dice per case is bit-identical
    dice_before = dice_per_case(torch.from_numpy(before).long(), target, num_labels=4)
    dice_after = dice_per_case(torch.from_numpy(after).long(), target, num_labels=4)
    np.testing.assert_array_equal(dice_after[:, :2].numpy(), dice_before[:, :2].numpy())
    # Assert: the coordinator's R keeps the organ route and adds the extension's own
    rows = registry.results(plan.name)["R"]
    assert rows[1][f"{ORGAN}@ct"] == rows[0][f"{ORGAN}@ct"]
    assert f"{SPINE}@ct" in rows[1] and f"{SPINE}@ct" not in rows[0]
    # Assert: the spine stage changed the extension only (trained or fitted, not zero)
    head = {k: v for k, v in spine.state_dict().items() if k.startswith(f"tasks.{SPINE}.")}
    assert head and any(bool(v.float().abs().sum() > 0) for v in head.values())
    for key, value in organs.state_dict().items():
        torch.testing.assert_close(spine.state_dict()[key], value, rtol=0, atol=0)
