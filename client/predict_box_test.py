"""``unicon predict --box``: the box carried through preprocessing, and its bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.data import preprocess_files
from client.errors import DataError
from client.inference import Predictor, box_in_patch
from client.predict import app
from server.export import export_version
from server.registry import Registry
from unicon_model.checkpoint import Lineage
from unicon_model.model import UniconModel
from unicon_model.prompts import label_boxes
from unicon_model.schema import DataSpec, ModalitySpec, ModelSpec, TaskSpec

runner = CliRunner()
PATCH = DataSpec(patch_size=(16, 16, 16))
# 0.5 x 0.5 x 2 mm voxels from (100, -50, 10) mm
AFFINE = np.array(
    [[0.5, 0, 0, 100.0], [0, 0.5, 0, -50.0], [0, 0, 2.0, 10.0], [0, 0, 0, 1]], dtype=np.float64
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported 16³ model with a plain and a prompted segmentation head (native spacing)."""
    root = tmp_path_factory.mktemp("predict-box")
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), head_hidden=8, seed=3))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="seg", kind="segmentation", labels=("background", "organ")))
    model.add_task(
        TaskSpec(name="lesion", kind="segmentation", labels=("background", "x"), prompt="box")
    )
    registry = Registry(root / "registry")
    lineage = Lineage(plan="tiny", stage="s", sites=["hospital-a"], rounds=1)
    version = registry.commit(model, lineage=lineage, data=PATCH)
    return export_version(registry, version, root / "package") / "model"


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20 x 16 x 12 CT: the patch crops 2 voxels off each x side and pads 2 on each z side."""
    path = tmp_path_factory.mktemp("case") / "ct.nii.gz"
    volume = np.random.default_rng(0).normal(0.0, 300.0, (20, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, AFFINE), str(path))
    return path


def test_a_voxel_box_goes_through_the_crop_and_pad(scan: Path) -> None:
    voxels, mask = box_in_patch("5,0,1,9,15,4", "voxel", scan, PATCH)
    assert voxels.tolist() == [[3, 7], [0, 15], [3, 6]]  # x - 2, y, z + 2
    assert mask.shape == (1, 1, 16, 16, 16)
    assert int(mask.sum()) == 5 * 16 * 4 and float(mask[0, 0, 3, 0, 3]) == 1.0


def test_a_world_box_goes_through_the_affine(scan: Path) -> None:
    # x 102.5..104.5 mm = voxels 5..9; y -50..-42.5 mm = 0..15; z 12..18 mm = 1..4
    voxels, _ = box_in_patch("102.5,-50,12,104.5,-42.5,18", "world", scan, PATCH)
    assert voxels.tolist() == [[3, 7], [0, 15], [3, 6]]


def test_a_resampled_box_matches_the_resampled_box_mask_within_a_voxel(tmp_path: Path) -> None:
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, -4.0, 7.0]
    box = np.zeros((8, 10, 6), dtype=np.float32)
    box[1:6, 2:8, 1:4] = 1
    for name, array in (("ct", np.ones_like(box)), ("box", box)):
        nib.save(nib.Nifti1Image(array, affine), str(tmp_path / f"{name}.nii.gz"))
    for spacing in ((1.0, 1.0, 1.0), (1.5, 1.5, 1.5), (2.5, 1.7, 3.3)):
        data = DataSpec(patch_size=(16, 16, 16), spacing=spacing)
        out = preprocess_files(
            {"ct": tmp_path / "ct.nii.gz"},
            {"box": tmp_path / "box.nii.gz"},
            patch_size=data.patch_size,
            spacing=data.spacing,
        )
        resampled, _ = label_boxes(torch.from_numpy(np.rint(out["box"])).long())
        voxels, _ = box_in_patch("1,2,1,5,7,3", "voxel", tmp_path / "ct.nii.gz", data)
        assert np.abs(voxels - resampled[0].numpy()).max() <= 1, (spacing, voxels, resampled)


@pytest.mark.parametrize(
    ("box", "space", "message"),
    [
        (
            "5,0,1,9,16,4",
            "voxel",
            r"axis 1 \(y\) spans voxels 0\.\.16, outside the image's 0\.\.15",
        ),
        ("-1,0,1,9,15,4", "voxel", r"axis 0 \(x\) spans voxels -1\.\.9.*\(20, 16, 12\)"),
        ("5,0,4,9,15,1", "voxel", r"z0 = 4 > z1 = 1 on axis 2 \(z\).*\(20, 16, 12\)"),
        ("102,-50,12,102,-45,18", "world", r"x0 = 102 == x1 = 102 on axis 0 \(x\).*empty"),
        ("0,0,0,10,10,10", "world", r"axis 0 \(x\) spans voxels -200\.\.-180"),
        ("1,2,3,4", "voxel", r"expected 6 finite numbers x0,y0,z0,x1,y1,z1 for a 3D image"),
        ("0,0,0,1,15,11", "voxel", r"outside the model's input patch .* axis 0 \(x\)"),
    ],
)
def test_a_bad_box_is_refused_naming_it(scan: Path, box: str, space: str, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        box_in_patch(box, space, scan, PATCH)  # type: ignore[arg-type]
    assert repr(box) in str(caught.value) and "ct.nii.gz" in str(caught.value)


def test_predict_uses_the_box_and_reports_it(model_dir: Path, scan: Path) -> None:
    predictor = Predictor(model_dir)
    boxed = predictor.predict({"ct": scan}, box="5,0,1,9,15,4")
    assert boxed["lesion"]["box"] == [3, 0, 3, 7, 15, 6]
    assert boxed["lesion"]["box_space"] == "patch voxels"
    assert "box" not in boxed["seg"]
    same = predictor.predict(
        {"ct": scan}, tasks=["lesion"], box="102.5,-50,12,104.5,-42.5,18", box_space="world"
    )
    assert same["lesion"] == boxed["lesion"]


def test_a_prompted_task_without_a_box_falls_back_with_a_warning(
    model_dir: Path, scan: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.inference"):
        result = Predictor(model_dir).predict({"ct": scan})
    assert result["lesion"]["box"] is None
    assert "task 'lesion' takes a box prompt but none was given" in caplog.text


def test_the_cli_refuses_a_box_for_a_task_without_prompting(model_dir: Path, scan: Path) -> None:
    base = ["--model", str(model_dir), "--image", f"ct={scan}"]
    refused = runner.invoke(app, [*base, "--task", "seg", "--box", "5,0,1,9,15,4"])
    assert refused.exit_code == 1
    assert "--box given for task(s) ['seg'], which take no box prompt" in refused.stderr
    outside = runner.invoke(app, [*base, "--box", "5,0,1,9,16,4"])
    assert outside.exit_code == 1 and "image shape (20, 16, 12)" in outside.stderr
    world = runner.invoke(
        app,
        [*base, "--task", "lesion", "--box", "102.5,-50,12,104.5,-42.5,18", "--box-space", "world"],
    )
    assert world.exit_code == 0, world.stderr
    assert json.loads(world.stdout)["lesion"]["box"] == [3, 0, 3, 7, 15, 6]


def test_no_task_takes_a_box(model_dir: Path, scan: Path) -> None:
    predictor = Predictor(model_dir)
    with pytest.raises(DataError, match=r"no task of \['seg'\] takes a box prompt"):
        predictor._prompts(["seg"], "5,0,1,9,15,4", "voxel", scan)
