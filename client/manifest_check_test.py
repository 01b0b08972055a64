"""Tests of the manifest check: files read, every problem in one report, rendering, CLI."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from client.manifest_check import ManifestReport, Problem, check_manifest

TASKS = {
    "lesion-class": {"kind": "classification", "classes": ["benign", "malignant"]},
    "survival": {"kind": "survival"},
    "lesion-seg": {"kind": "segmentation", "labels": ["background", "tumour"]},
}
SHAPE = (8, 8, 6)
runner = CliRunner()


def _nifti(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return str(path.relative_to(path.parent.parent))


def _volume(seed: int, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _mask(shape: tuple[int, ...] = SHAPE, value: int = 1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[2:4, 2:4, 1:3] = value
    return mask


def _write_manifest(folder: Path, cases: list[dict[str, Any]], tasks: Any = None) -> Path:
    path = folder / "manifest.yaml"
    manifest = {"site": folder.name, "tasks": TASKS if tasks is None else tasks, "cases": cases}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


@pytest.fixture
def clean_site(tmp_path: Path) -> Path:
    """Six cases: 4 train (2 with PET), 1 val, 1 test; every task labelled."""
    folder = tmp_path / "clean-site"
    cases = []
    splits = ["train", "train", "train", "train", "val", "test"]
    classes = ["benign", "malignant", "malignant", "benign", "malignant", "benign"]
    for i, (split, label) in enumerate(zip(splits, classes, strict=True)):
        case_id = f"clean-{i}"
        images = {"ct": _nifti(folder / "ct" / f"{case_id}.nii.gz", _volume(i))}
        if i < 2:
            images["pet"] = _nifti(folder / "pet" / f"{case_id}.nii.gz", _volume(10 + i))
        cases.append(
            {
                "id": case_id,
                "split": split,
                "images": images,
                "clinical": {"age": 50 + i},
                "labels": {
                    "lesion-class": label,
                    "survival": {"time": 100.0 + i, "event": i % 2},
                    "lesion-seg": _nifti(folder / "seg" / f"{case_id}.nii.gz", _mask()),
                },
            }
        )
    return _write_manifest(folder, cases)


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """One problem per case, a task without train cases, a class without train cases."""
    folder = tmp_path / "broken-site"
    good_ct = _nifti(folder / "ct" / "good.nii.gz", _volume(0))
    good_mask = _nifti(folder / "seg" / "good.nii.gz", _mask())
    corrupt = folder / "ct" / "corrupt.nii.gz"
    corrupt.write_bytes(b"definitely not gzip")
    nan_volume = _volume(1)
    nan_volume[1, 2, 3] = np.nan
    cases = [
        {"id": "missing", "images": {"ct": "ct/absent.nii.gz"}},
        {"id": "corrupt", "images": {"ct": "ct/corrupt.nii.gz"}},
        {"id": "nan", "images": {"ct": _nifti(folder / "ct" / "nan.nii.gz", nan_volume)}},
        {
            "id": "mask-shape",
            "images": {"ct": good_ct},
            "labels": {"lesion-seg": _nifti(folder / "seg" / "small.nii.gz", _mask((4, 4, 3)))},
        },
        {
            "id": "mask-value",
            "images": {"ct": good_ct},
            "labels": {"lesion-seg": _nifti(folder / "seg" / "three.nii.gz", _mask(value=3))},
        },
        {
            "id": "unknown-modality",
            "images": {"mri": _nifti(folder / "mri" / "mri.nii.gz", _volume(2))},
            "labels": {"lesion-class": "benign"},
        },
        {
            "id": "two-grids",
            "images": {
                "ct": good_ct,
                "pet": _nifti(folder / "pet" / "coarse.nii.gz", _volume(3, (4, 4, 3))),
            },
            "labels": {"lesion-seg": good_mask},
        },
        {
            "id": "val-only-survival",
            "split": "val",
            "images": {"ct": good_ct},
            "labels": {"survival": {"time": 10.0, "event": 1}, "lesion-class": "malignant"},
        },
        {
            "id": "test-case",
            "split": "test",
            "images": {"ct": good_ct},
            "labels": {"lesion-class": "benign", "lesion-seg": good_mask},
        },
    ]
    return _write_manifest(folder, cases)


def _find(report: ManifestReport, case: str | None, field: str) -> Problem:
    matches = [p for p in report.problems if p.case == case and p.field == field]
    assert matches, (case, field, [str(p) for p in report.problems])
    return matches[0]


def test_clean_site_is_ok_with_hand_computed_counts(clean_site: Path) -> None:
    # Execute
    report = check_manifest(clean_site, known_modalities=["ct", "pet"])
    # Assert
    assert report.ok
    assert report.problems == []
    assert report.manifest is not None and report.manifest.site == "clean-site"
    assert report.counts == {
        "cases": {"train": 4, "val": 1, "test": 1},
        "tasks": {task: {"train": 4, "val": 1, "test": 1} for task in TASKS},
        "modalities": {
            "ct": {"train": 4, "val": 1, "test": 1},
            "pet": {"train": 2, "val": 0, "test": 0},
        },
        "classes": {"lesion-class": {"benign": 2, "malignant": 2}},
        "unlabelled": {"train": 0, "val": 0, "test": 0},
    }


def test_broken_site_reports_every_problem_at_once(broken_site: Path) -> None:
    # Execute
    report = check_manifest(broken_site, known_modalities=["ct", "pet"], progress=True)
    # Assert: one error per planted problem, located by case and field
    assert not report.ok
    assert report.manifest is not None
    expected = {
        ("missing", "images.ct"): "does not exist",
        ("corrupt", "images.ct"): "cannot read the file",
        ("nan", "images.ct"): "1 NaN or infinite voxel(s)",
        ("mask-shape", "labels.lesion-seg"): "differs from the grid 8x8x6",
        ("mask-value", "labels.lesion-seg"): "integers in 0..1",
        ("unknown-modality", "images.mri"): "'mri' is not a modality input",
        ("two-grids", "images"): "different grids",
        (None, "tasks.survival"): "no train case has a label for task 'survival'",
    }
    for (case, field), text in expected.items():
        problem = _find(report, case, field)
        assert problem.severity == "error"
        assert text in problem.message, problem
    assert "corrupt.nii.gz" in _find(report, "corrupt", "images.ct").message
    assert "has 3" in _find(report, "mask-value", "labels.lesion-seg").message
    assert len(report.errors) == len(expected)
    # Assert: warnings do not make the report fail on their own
    class_warning = _find(report, None, "tasks.lesion-class.classes")
    assert class_warning.severity == "warning"
    assert "'malignant' has no train case" in class_warning.message
    assert _find(report, None, "tasks.survival").severity == "error"
    assert any(
        p.severity == "warning" and "no test case" in p.message and p.field == "tasks.survival"
        for p in report.problems
    )


def test_render_lists_problems_and_summaries(broken_site: Path) -> None:
    # Prepare
    report = check_manifest(broken_site)
    console = Console(record=True, width=200)
    # Execute
    report.render(console)
    text = console.export_text()
    # Assert
    for case in ("missing", "corrupt", "nan", "mask-shape", "mask-value", "two-grids"):
        assert case in text
    assert "lesion-class" in text and "classification" in text
    assert "benign 1 / malignant 0" in text
    assert "modality" in text and "pet" in text


def test_invalid_manifest_carries_the_load_problems(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "site"
    folder.mkdir()
    path = _write_manifest(
        folder,
        [{"id": "c1", "split": "training", "images": {"ct": "c1.nii.gz"}}],
    )
    # Execute
    report = check_manifest(path)
    console = Console(record=True, width=200)
    report.render(console)
    # Assert
    assert not report.ok
    assert report.manifest is None and report.counts == {}
    problem = _find(report, "c1", "split")
    assert "unknown split 'training'" in problem.message
    assert "c1" in console.export_text()


def test_synthetic_sites_are_ok(tmp_path: Path) -> None:
    # Prepare
    from simulations.synthetic import make_sites

    paths = make_sites(tmp_path, sites=2, size=16, cases_per_site=8)
    # Execute
    reports = [check_manifest(p, known_modalities=["ct", "pet"]) for p in paths]
    # Assert
    for report in reports:
        assert report.ok, [str(p) for p in report.problems]
        assert report.counts["tasks"]["lesion-seg"]["train"] > 0


def _unicon_app() -> Any:
    from unicon_cli.main import full_app

    return full_app()


def test_cli_site_check_exits_1_on_errors_and_0_when_clean(
    clean_site: Path, broken_site: Path
) -> None:
    # Prepare
    app = _unicon_app()
    # Execute
    broken = runner.invoke(app, ["site", "check", str(broken_site), "--modalities", "ct,pet"])
    clean = runner.invoke(app, ["site", "check", str(clean_site)])
    # Assert
    assert broken.exit_code == 1, broken.output
    assert "errors found" in broken.output
    assert clean.exit_code == 0, clean.output
    assert "is valid" in clean.output


def test_field_errors_and_file_problems_are_reported_in_one_run(tmp_path: Path) -> None:
    # Prepare: manifest field errors AND file problems in valid cases, in one manifest
    folder = tmp_path / "both-kinds"
    good_ct = _nifti(folder / "ct" / "good.nii.gz", _volume(0))
    (folder / "ct" / "corrupt.nii.gz").write_bytes(b"definitely not gzip")
    nan_volume = _volume(1)
    nan_volume[0, 0, 0] = np.nan
    cases = [
        {"id": "bad-split", "split": "training", "images": {"ct": good_ct}},
        {"id": "dup", "images": {"ct": good_ct}, "labels": {"lesion-class": "benign"}},
        {"id": "dup", "images": {"ct": good_ct}},
        {"id": "extra-field", "images": {"ct": good_ct}, "imgs": {}},
        {"id": "undeclared", "images": {"ct": good_ct}, "labels": {"grading": "high"}},
        {"id": "missing", "images": {"ct": "ct/absent.nii.gz"}},
        {"id": "corrupt", "images": {"ct": "ct/corrupt.nii.gz"}},
        {"id": "nan", "images": {"ct": _nifti(folder / "ct" / "nan.nii.gz", nan_volume)}},
        {
            "id": "two-grids",
            "images": {
                "ct": good_ct,
                "pet": _nifti(folder / "pet" / "coarse.nii.gz", _volume(3, (4, 4, 3))),
            },
        },
        {
            "id": "mask-shape",
            "images": {"ct": good_ct},
            "labels": {"lesion-seg": _nifti(folder / "seg" / "small.nii.gz", _mask((4, 4, 3)))},
        },
    ]
    path = folder / "manifest.yaml"
    manifest = {"site": "site\u200b-a", "sitename": "x", "tasks": TASKS, "cases": cases}
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    # Execute
    report = check_manifest(path, known_modalities=["ct", "pet"])
    # Assert: every kind is there, each naming the case or field and the file
    assert not report.ok and report.manifest is None
    expected = {
        (None, "site"): "is not a valid name",
        (None, "sitename"): "unknown field",
        ("bad-split", "split"): "unknown split 'training'",
        ("dup", "id"): "duplicate case id",
        ("extra-field", "imgs"): "unknown field",
        ("undeclared", "labels.grading"): "is not declared under tasks",
        ("missing", "images.ct"): "absent.nii.gz does not exist",
        ("corrupt", "images.ct"): "corrupt.nii.gz",
        ("nan", "images.ct"): "nan.nii.gz has 1 NaN",
        ("two-grids", "images"): "different grids",
        ("mask-shape", "labels.lesion-seg"): "differs from the grid 8x8x6",
    }
    for (case, field), text in expected.items():
        problem = _find(report, case, field)
        assert problem.severity == "error"
        assert text in problem.message, problem
    assert "'site\\u200b-a'" in _find(report, None, "site").message
    # the duplicate is a field error; its files are not read, nor split counts guessed from
    # the valid cases alone (they would report false gaps)
    assert len(report.errors) == len(expected), [str(p) for p in report.errors]
    assert report.warnings == []
    # Execute: the CLI reports the same, in one run
    result = runner.invoke(_unicon_app(), ["site", "check", str(path)], env={"COLUMNS": "250"})
    # Assert
    assert result.exit_code == 1, result.output
    for case in ("bad-split", "dup", "extra-field", "missing", "corrupt", "nan", "two-grids"):
        assert case in result.output
    assert f"{len(expected)} error(s)" in result.output


def test_image_declaring_too_many_voxels_is_reported_without_reading(tmp_path: Path) -> None:
    # Prepare: a case whose CT header declares 720^3 voxels, in a ~60-byte file
    folder = tmp_path / "oversized"
    folder.mkdir()
    header = nib.Nifti1Header()
    header.set_data_shape((720, 720, 720))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    (folder / "bomb.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    path = _write_manifest(folder, [{"id": "bomb", "images": {"ct": "bomb.nii.gz"}}])
    # Execute
    report = check_manifest(path)
    # Assert
    message = _find(report, "bomb", "images.ct").message
    assert "bomb.nii.gz" in message and "720x720x720" in message and "limit" in message
