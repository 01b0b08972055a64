"""The data pipeline: intensity transforms, resampling, crop/pad, disk cache, skipped cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

import client.data
from client.data import build_dataset, label_key
from client.manifest import load_manifest
from client.transforms import DEFAULT_CT_WINDOW as CT_WINDOW
from client.transforms import SUV_MAX
from unicon_model.schema import DataSpec, ModalitySpec, TaskSpec

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
