"""The data pipeline: intensity transforms, resampling, crop/pad, disk cache, skipped cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

import client.data
from client.data import CaseDataset, build_dataset, label_key
from client.manifest import load_manifest
from client.transforms import DEFAULT_CT_WINDOW as CT_WINDOW
from client.transforms import SUV_MAX
from unicon_model.schema import AugmentationSpec, DataSpec, ModalitySpec, TaskSpec

CLS = TaskSpec(name="cls", kind="classification", classes=("benign", "malignant"))
SEG = TaskSpec(name="seg", kind="segmentation", labels=("background", "tumour"))


def write_nifti(path: Path, array: np.ndarray, spacing: float = 2.0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))
    return path.name


def site(tmp_path: Path, cases: list[dict[str, Any]]) -> Path:
    manifest = {
        "site": "s",
        "tasks": {
            "cls": {"kind": "classification", "classes": ["benign", "malignant"]},
            "seg": {"kind": "segmentation", "labels": ["background", "tumour"]},
        },
        "cases": cases,
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def ramp(shape: tuple[int, int, int], low: float, high: float) -> np.ndarray:
    values = np.linspace(low, high, int(np.prod(shape)), dtype=np.float32)
    return values.reshape(shape)


def test_ct_window_pet_suv_resampling_and_crop(tmp_path: Path) -> None:
    # Prepare: a 2 mm 8³ CT ramp over and beyond the window, a PET ramp, and a mask
    ct = ramp((8, 8, 8), -1500.0, 1000.0)
    pet = ramp((8, 8, 8), 0.0, 20.0)
    mask = np.zeros((8, 8, 8), dtype=np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    write_nifti(tmp_path / "ct.nii.gz", ct)
    write_nifti(tmp_path / "pet.nii.gz", pet)
    write_nifti(tmp_path / "seg.nii.gz", mask)
    path = site(
        tmp_path,
        [
            {
                "id": "c1",
                "images": {"ct": "ct.nii.gz", "pet": "pet.nii.gz"},
                "labels": {"cls": "malignant", "seg": "seg.nii.gz"},
            }
        ],
    )
    modality = ModalitySpec(name="pet", inputs=("ct", "pet"))
    # Execute: native spacing, patch 10³ (pads), then 4 mm (halves), patch 4³
    native = build_dataset(
        load_manifest(path),
        split="train",
        modality=modality,
        tasks={"cls": CLS, "seg": SEG},
        data=DataSpec(patch_size=(10, 10, 10)),
    )
    coarse = build_dataset(
        load_manifest(path),
        split="train",
        modality=modality,
        tasks={"cls": CLS, "seg": SEG},
        data=DataSpec(patch_size=(4, 4, 4), spacing=(4.0, 4.0, 4.0)),
    )
    # Assert: CT mapped by the HU window and clipped, PET by SUV_MAX, padding is centred
    sample = native[0]
    assert sample["image"].shape == (2, 10, 10, 10)
    inner = sample["image"][:, 1:9, 1:9, 1:9].numpy()
    expected_ct = np.clip((ct - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0, 1)
    np.testing.assert_allclose(inner[0], expected_ct, atol=1e-5)
    np.testing.assert_allclose(inner[1], np.clip(pet / SUV_MAX, 0, 1), atol=1e-5)
    assert int(sample[label_key("cls", "label")]) == 1
    assert int(sample[label_key("seg", "mask")].sum()) == int(mask.sum())
    # resampled to 4 mm: 8 voxels of 2 mm become 4, the mask keeps integer labels
    coarse_sample = coarse[0]
    assert coarse_sample["image"].shape == (2, 4, 4, 4)
    assert set(np.unique(coarse_sample[label_key("seg", "mask")].numpy())) <= {0, 1}
    assert int(coarse_sample[label_key("seg", "mask")].sum()) == 8  # 4³ mm³ cube of 64 voxels


def test_the_plan_chooses_the_ct_window(tmp_path: Path) -> None:
    # Prepare: a CT ramp from -1500 to 1000 HU, cached, read with two plan windows
    ct = ramp((8, 8, 8), -1500.0, 1000.0)
    write_nifti(tmp_path / "ct.nii.gz", ct)
    path = site(
        tmp_path, [{"id": "c1", "images": {"ct": "ct.nii.gz"}, "labels": {"cls": "benign"}}]
    )
    cache = tmp_path / "cache"

    def image(window: tuple[float, float]) -> np.ndarray:
        dataset = build_dataset(
            load_manifest(path),
            split="train",
            modality=ModalitySpec(name="ct"),
            tasks={"cls": CLS},
            data=DataSpec(patch_size=(8, 8, 8), ct_window=window),
            cache_dir=cache,
        )
        return dataset[0]["image"][0].numpy()

    # Execute
    lung, abdomen = image((-1000.0, 400.0)), image((-160.0, 240.0))
    # Assert: each window maps its own HU range to [0, 1]; the cache keeps them apart
    np.testing.assert_allclose(lung, np.clip((ct + 1000) / 1400, 0, 1), atol=1e-5)
    np.testing.assert_allclose(abdomen, np.clip((ct + 160) / 400, 0, 1), atol=1e-5)
    with pytest.raises(ValueError, match="ct_window"):
        DataSpec(ct_window=(240.0, -160.0))


def test_cache_avoids_rereading_and_corrupt_cases_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: three cases, one of them a corrupt file
    for name in ("a", "b"):
        write_nifti(tmp_path / f"{name}.nii.gz", ramp((8, 8, 8), -1000.0, 400.0))
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti file")
    path = site(
        tmp_path,
        [
            {"id": "a", "images": {"ct": "a.nii.gz"}, "labels": {"cls": "benign"}},
            {"id": "bad", "images": {"ct": "bad.nii.gz"}, "labels": {"cls": "benign"}},
            {"id": "b", "images": {"ct": "b.nii.gz"}, "labels": {"cls": "malignant"}},
        ],
    )
    reads: list[Path] = []
    original = client.data.read_image

    def counting(p: Path) -> Any:
        reads.append(Path(p))
        return original(p)

    monkeypatch.setattr(client.data, "read_image", counting)

    def build() -> client.data.CaseDataset:
        return build_dataset(
            load_manifest(path),
            split="train",
            modality=ModalitySpec(name="ct"),
            tasks={"cls": CLS},
            data=DataSpec(patch_size=(8, 8, 8)),
            cache_dir=tmp_path / "cache",
        )

    # Execute
    first = build()
    first_reads = len(reads)
    second = build()
    # Assert: the corrupt case is skipped with its reason, the round goes on with the rest;
    # the second build reads only the file that could not be cached
    assert first.case_ids == ["a", "b"] == second.case_ids
    assert [s.case for s in first.skipped] == ["bad"]
    assert "bad.nii.gz" in first.skipped[0].reason
    assert first_reads == 3
    assert [p.name for p in reads[first_reads:]] == ["bad.nii.gz"]
    for x, y in zip(first.samples, second.samples, strict=True):
        assert all(bool((x[k] == y[k]).all()) for k in x)
    # a changed source file invalidates its cache entry
    write_nifti(tmp_path / "a.nii.gz", ramp((8, 8, 8), -900.0, 300.0))
    third = build()
    assert "a.nii.gz" in [p.name for p in reads[first_reads + 1 :]]
    assert not bool((third.samples[0]["image"] == first.samples[0]["image"]).all())


def test_labels_outside_the_plan_skip_the_case_with_the_reason(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", ramp((8, 8, 8), -1000.0, 400.0))
    mask = np.full((8, 8, 8), 3, dtype=np.uint8)
    write_nifti(tmp_path / "m.nii.gz", mask)
    path = site(
        tmp_path,
        [{"id": "a", "images": {"ct": "a.nii.gz"}, "labels": {"seg": "m.nii.gz"}}],
    )
    data = build_dataset(
        load_manifest(path),
        split="train",
        modality=ModalitySpec(name="ct"),
        tasks={"seg": SEG},
        data=DataSpec(patch_size=(8, 8, 8)),
    )
    assert len(data) == 0
    assert "outside 0..1" in data.skipped[0].reason


# --------------------------------------------------------------------------- augmentation


def asymmetric_site(tmp_path: Path, splits: tuple[str, ...] = ("train",)) -> Path:
    """One 4³ case per split: a CT ramp (no symmetry) and a one-voxel mask off every axis."""
    write_nifti(tmp_path / "ct.nii.gz", ramp((4, 4, 4), -160.0, 240.0))
    mask = np.zeros((4, 4, 4), dtype=np.uint8)
    mask[0, 1, 3] = 1
    write_nifti(tmp_path / "seg.nii.gz", mask)
    cases = [
        {
            "id": f"c-{split}",
            "split": split,
            "images": {"ct": "ct.nii.gz"},
            "labels": {"cls": "malignant", "seg": "seg.nii.gz"},
        }
        for split in splits
    ]
    return site(tmp_path, cases)


def cases(path: Path, augmentation: AugmentationSpec, split: str = "train") -> CaseDataset:
    return build_dataset(
        load_manifest(path),
        split=split,
        modality=ModalitySpec(name="ct"),
        tasks={"cls": CLS, "seg": SEG},
        data=DataSpec(patch_size=(4, 4, 4), augmentation=augmentation),
    )


def same(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> bool:
    """Equal keys, dtypes, shapes and values, bit for bit."""
    return x.keys() == y.keys() and all(
        x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x
    )


MASK = label_key("seg", "mask")


def test_augmentation_off_gives_the_stored_samples_bit_for_bit(tmp_path: Path) -> None:
    # Prepare: the plan without augmentation, and one whose probabilities are all 0
    path = asymmetric_site(tmp_path)
    plain = cases(path, AugmentationSpec())
    zero = cases(path, AugmentationSpec(rotate_deg=30.0, noise_std=0.3))
    # Execute
    torch.manual_seed(0)
    drawn = [plain.augmented()[0], zero.augmented()[0]]
    # Assert: no augmenter, training reads the dataset itself, samples unchanged
    assert plain.augmentation is None and zero.augmentation is None
    assert plain.augmented() is plain and zero.augmented() is zero
    assert all(same(d, plain.samples[0]) for d in drawn)
    assert same(zero.samples[0], plain.samples[0])


def test_flips_mirror_image_and_mask_together_and_keep_the_labels(tmp_path: Path) -> None:
    # Prepare: flips with probability 1 (every axis), a case with a one-voxel mask
    path = asymmetric_site(tmp_path)
    dataset = cases(path, AugmentationSpec(flip_prob=1.0))
    stored = {k: v.clone() for k, v in dataset.samples[0].items()}
    assert stored[MASK][0, 1, 3] == 1 and int(stored[MASK].sum()) == 1
    # Execute
    torch.manual_seed(0)
    flipped = dataset.augmented()[0]
    # Assert: by hand, voxel (0, 1, 3) of a 4³ grid goes to (3, 2, 0), in image and mask
    assert flipped[MASK][3, 2, 0] == 1 and int(flipped[MASK].sum()) == 1
    assert flipped["image"][0, 3, 2, 0] == stored["image"][0, 0, 1, 3]
    assert torch.equal(flipped["image"], torch.flip(stored["image"], dims=(1, 2, 3)))
    assert flipped["image"].dtype == torch.float32 and flipped[MASK].dtype == torch.int64
    assert type(flipped["image"]) is torch.Tensor  # no MONAI MetaTensor in training batches
    for key in stored.keys() - {"image", MASK}:  # class label, has-flags: unchanged
        assert torch.equal(flipped[key], stored[key]), key
    # the stored sample itself is never modified
    assert same(dataset.samples[0], stored) and same(dataset[0], stored)


def test_affine_keeps_integer_masks_and_intensity_noise_touch_the_image_only(
    tmp_path: Path,
) -> None:
    # Prepare: a strong affine; separately intensity changes and noise only
    path = asymmetric_site(tmp_path)
    warped = cases(path, AugmentationSpec(affine_prob=1.0, rotate_deg=45.0, scale_range=0.3))
    intensity = cases(path, AugmentationSpec(intensity_prob=1.0, noise_prob=1.0, noise_std=0.1))
    stored = intensity.samples[0]
    # Execute: draws under torch seeds (what the trainer's seeded RNG gives)
    draws = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        draws.append(warped.augmented()[0])
    torch.manual_seed(0)
    noisy = intensity.augmented()[0]
    # Assert: the masks keep labels {0, 1}; the same seed gives the same draw, seeds differ
    for draw in draws:
        assert set(draw[MASK].unique().tolist()) <= {0, 1}
        assert draw[MASK].dtype == torch.int64 and draw[MASK].shape == (4, 4, 4)
    assert same(draws[0], draws[1])
    assert any(not torch.equal(d["image"], draws[0]["image"]) for d in draws[2:])
    assert not torch.equal(noisy["image"], stored["image"])
    assert torch.equal(noisy[MASK], stored[MASK])


def test_val_and_test_splits_are_never_augmented(tmp_path: Path) -> None:
    # Prepare: a plan that turns every transform on, a case in each split
    path = asymmetric_site(tmp_path, splits=("train", "val", "test"))
    everything = AugmentationSpec(
        flip_prob=1.0, affine_prob=1.0, intensity_prob=1.0, noise_prob=1.0
    )
    # Execute
    built = {split: cases(path, everything, split) for split in ("train", "val", "test")}
    # Assert: only the training dataset has an augmenter; evaluation reads stored samples
    assert built["train"].augmentation is not None
    torch.manual_seed(0)
    assert not same(built["train"].augmented()[0], built["train"].samples[0])
    for split in ("val", "test"):
        dataset = built[split]
        assert dataset.augmentation is None and dataset.augmented() is dataset, split
        assert same(dataset[0], built["train"].samples[0]), split
    # indexing a training dataset directly (evaluation of the train split, analytic
    # statistics, Fisher information) never augments either
    assert same(built["train"][0], built["val"][0])
