"""Organ then lesion (issue 13, item 3): a new segmentation task forgets nothing earlier.

Runs ``examples/plans/organ_then_lesion.toml``, shrunk to the tiny model, 16³ patches and one
round per stage, in process over the session's synthetic sites (which carry the generator's
organ label maps), and checks that the lesion stage leaves the organ task's predictions, and
so its Dice per case, exactly as the organ stage left them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from client.data import build_dataset, label_key
from client.manifest import load_manifest
from client.trainer import predict
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.synthetic import ORGANS, TASKS
from tests.conftest import TINY_MODEL
from unicon_model.metrics.segmentation import dice_per_case
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plans" / "organ_then_lesion.toml"
SITES = ["hospital-a", "hospital-b", "hospital-c"]
ORGAN, LESION = "organ-seg", "lesion-seg"


def tiny_organ_then_lesion() -> Plan:
    """The example plan on the tiny model, 16³ patches, one round of one epoch per stage."""
    raw: dict[str, Any] = tomllib.loads(EXAMPLE.read_text())
    raw["model"] = dict(TINY_MODEL)
    raw["data"]["patch_size"] = [16, 16, 16]
    for stage in raw["stages"]:
        stage.update(rounds=1, local_epochs=1)
    return validate_plan(raw)


def organ_outputs(
    model: UniconModel, plan: Plan, sites_dir: Path
) -> tuple[np.ndarray, torch.Tensor]:
    """The organ task's predicted label maps and targets on every site's test cases."""
    spec = plan.tasks_until(0)[ORGAN]
    modality = plan.stages[0].add_modalities[0]
    outputs, targets = [], []
    for site in SITES:
        manifest = load_manifest(sites_dir / site / "manifest.yaml")
        dataset = build_dataset(
            manifest, split="test", modality=modality, tasks={ORGAN: spec}, data=plan.data
        )
        out, batches = predict(model, dataset, spec, device=torch.device("cpu"))
        outputs.append(out)
        targets.append(torch.cat([b[label_key(ORGAN, "mask")] for b in batches]))
    target = torch.cat(targets).long()
    return np.concatenate(outputs), target.reshape(target.shape[0], *outputs[0].shape[1:])


def test_the_example_plan_declares_the_generated_organ_labels() -> None:
    raw = tomllib.loads(EXAMPLE.read_text())
    organ = raw["stages"][0]["add_tasks"][0]
    assert organ["name"] == ORGAN and organ["labels"] == TASKS[ORGAN]["labels"]
    assert organ["labels"][1:] == sorted(ORGANS, key=ORGANS.__getitem__)
    assert raw["stages"][1]["add_tasks"][0]["name"] == LESION
    assert "train" not in raw["stages"][1]  # the lesion stage trains only what it adds


def test_a_lesion_stage_after_an_organ_stage_leaves_organ_dice_exactly_unchanged(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    plan = tiny_organ_then_lesion()
    registry = Registry(tmp_path / "registry")
    sites = InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state")
    # Execute
    progress = Coordinator(plan, registry, sites, site_wait=0).run()
    after_organs, _ = registry.load("v0001-organs")
    after_lesions, _ = registry.load("v0002-lesions")
    before, target = organ_outputs(after_organs, plan, sites_dir)
    after, target_again = organ_outputs(after_lesions, plan, sites_dir)
    # Assert: both stages ran, and the lesion stage trained its own encoder deltas
    assert progress.completed_stages == ["organs", "lesions"]
    assert after_lesions.component_names == [
        "backbone",
        "modality/ct",
        "task/organ-seg",
        "task/lesion-seg",
    ]
    deltas = {k: v for k, v in after_lesions.state_dict().items() if ".lora" in k and LESION in k}
    assert deltas and any(bool(v.abs().sum() > 0) for v in deltas.values())
    # Assert: every organ prediction on every test case is bit-identical, so is its Dice
    assert torch.equal(target, target_again) and len(before) >= len(SITES) * 2
    np.testing.assert_array_equal(after, before)
    labels = len(TASKS[ORGAN]["labels"])
    dice_before = dice_per_case(torch.from_numpy(before).long(), target, num_labels=labels)
    dice_after = dice_per_case(torch.from_numpy(after).long(), target, num_labels=labels)
    np.testing.assert_array_equal(dice_after.numpy(), dice_before.numpy())
    rows = registry.results(plan.name)["R"]  # R[stage][route], the sites' pooled Dice
    assert rows[1][f"{ORGAN}@ct"] == rows[0][f"{ORGAN}@ct"]
    # Assert: the organ Dice of one case as MONAI's DiceMetric computes it
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    pred = one_hot(torch.from_numpy(after[:1]).long().unsqueeze(1), num_classes=labels)
    truth = one_hot(target[:1].unsqueeze(1), num_classes=labels)
    expected = metric(pred, truth)
    assert isinstance(expected, torch.Tensor)
    torch.testing.assert_close(dice_after[:1], expected.float(), equal_nan=True)
    assert bool(torch.isfinite(expected).all())  # every organ is in the case
