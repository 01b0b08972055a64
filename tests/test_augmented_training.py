"""Local training reads the plan's augmentation: seeded, and only in gradient training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import yaml

from client.data import CaseDataset, build_dataset
from client.manifest import load_manifest
from client.trainer import evaluate, train
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan


def tiny(augmentation: dict[str, Any]) -> Plan:
    """A 2-level encoder on 8³ patches, one stage that trains everything."""
    return validate_plan(
        {
            "name": "aug",
            "model": {"widths": [2, 4], "adapter_rank": 1, "head_hidden": 4},
            "data": {"patch_size": [8, 8, 8], "augmentation": augmentation},
            "stages": [
                {
                    "name": "s",
                    "add_modalities": [{"name": "ct"}],
                    "add_tasks": [
                        {"name": "seg", "kind": "segmentation", "labels": ["bg", "lesion"]}
                    ],
                    "train": ["backbone", "modality/ct", "task/seg"],
                    "batch_size": 2,
                    "optimizer": {"name": "sgd", "lr": 0.1},
                }
            ],
        }
    )


def training_cases(tmp_path: Path, plan: Plan) -> CaseDataset:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(2):
        ct = rng.uniform(-200.0, 300.0, (8, 8, 8)).astype(np.float32)
        mask = np.zeros((8, 8, 8), dtype=np.uint8)
        mask[1 : 3 + i, 2:5, 0:3] = 1
        for name, array in ((f"ct{i}", ct), (f"m{i}", mask)):
            nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
        cases.append(
            {"id": f"c{i}", "images": {"ct": f"ct{i}.nii.gz"}, "labels": {"seg": f"m{i}.nii.gz"}}
        )
    manifest = {
        "site": "s",
        "tasks": {"seg": {"kind": "segmentation", "labels": ["bg", "lesion"]}},
        "cases": cases,
    }
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return build_dataset(
        load_manifest(tmp_path / "manifest.yaml"),
        split="train",
        modality=plan.modalities_until(0)["ct"],
        tasks=plan.tasks_until(0),
        data=plan.data,
    )


def test_training_follows_the_seed_through_augmentation_and_evaluation_does_not(
    tmp_path: Path,
) -> None:
    # Prepare: the same cases with and without augmentation (flips always, noise always)
    plain_plan = tiny({})
    aug_plan = tiny({"flip_prob": 1.0, "noise_prob": 1.0, "noise_std": 0.2})
    plain = training_cases(tmp_path, plain_plan)
    augmented = training_cases(tmp_path, aug_plan)
    stored = [{k: v.clone() for k, v in s.items()} for s in augmented.samples]
    tasks = aug_plan.tasks_until(0)

    def update(plan: Plan, data: CaseDataset, seed: int) -> dict[str, torch.Tensor]:
        model = UniconModel.from_plan(plan, through_stage=0)
        return train(
            model, plan.stages[0], data, tasks=tasks, seed=seed, device=torch.device("cpu")
        ).update

    # Execute
    base = update(plain_plan, plain, 0)
    first, again = update(aug_plan, augmented, 0), update(aug_plan, augmented, 0)
    model = UniconModel.from_plan(aug_plan, through_stage=0)
    scores = [evaluate(model, augmented, tasks=tasks) for _ in range(2)]
    # Assert: the trainer trained on augmented samples, reproducibly from its seed
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], base[k]) for k in first)
    # evaluation reads the stored samples (equal scores), which training never modified
    assert scores[0] == scores[1]
    for sample, kept in zip(augmented.samples, stored, strict=True):
        assert all(torch.equal(sample[k], kept[k]) for k in kept)
