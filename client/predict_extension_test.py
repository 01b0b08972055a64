"""``unicon predict`` on a task with a label extension returns the merged label map."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.data import preprocess_files
from client.inference import Predictor
from client.predict import app
from server.export import export_version
from server.registry import Registry
from unicon_model.checkpoint import Lineage
from unicon_model.label_extensions import merge_label_maps
from unicon_model.model import UniconModel
from unicon_model.schema import DataSpec, ModalitySpec, ModelSpec, TaskSpec

PATCH = DataSpec(patch_size=(16, 16, 16))
ORGANS = TaskSpec(name="organ-seg", kind="segmentation", labels=("background", "liver", "lungs"))
SPINE = TaskSpec(
    name="organ-spine", kind="segmentation", labels=("background", "spine"), extends="organ-seg"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, UniconModel]:
    """An exported 16³ model: organ-seg and its spine extension, heads that predict labels."""
    root = tmp_path_factory.mktemp("predict-extension")
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), head_hidden=8, seed=5))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(ORGANS)
    model.add_task(SPINE)
    with torch.no_grad():  # no background bias: every label wins somewhere
        for name in ("organ-seg", "organ-spine"):
            model.tasks[name].out.bias.zero_()
    registry = Registry(root / "registry")
    lineage = Lineage(plan="tiny", stage="spine", sites=["hospital-a"], rounds=1)
    version = registry.commit(model, lineage=lineage, data=PATCH)
    return export_version(registry, version, root / "package") / "model", model


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("case") / "ct.nii.gz"
    volume = np.random.default_rng(1).normal(0.0, 300.0, (16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return path


def test_the_base_task_gives_the_merged_map_and_the_extension_is_not_listed(
    exported: tuple[Path, UniconModel], scan: Path, tmp_path: Path
) -> None:
    # Prepare: the expected map, merged by hand from the two heads' argmaxes
    package, model = exported
    arrays = preprocess_files({"ct": scan}, patch_size=(16, 16, 16), spacing=None)
    x = torch.from_numpy(arrays["ct"])[None]
    with torch.no_grad():
        organs = model(x, modality="ct", task="organ-seg").argmax(1)[0]
        spine = model(x, modality="ct", task="organ-spine").argmax(1)[0]
    expected = merge_label_maps(organs, [(spine, 2)], 3).numpy()
    # Execute
    result = Predictor(package).predict({"ct": scan}, mask_out=tmp_path / "case.nii.gz")
    # Assert: one entry for organ-seg over all four labels, counts and mask as merged
    assert set(result) == {"modality", "organ-seg"}
    voxels = result["organ-seg"]["voxels"]
    assert list(voxels) == ["background", "liver", "lungs", "spine"]
    assert voxels == {n: int((expected == i).sum()) for i, n in enumerate(voxels)}
    assert all(voxels[n] > 0 for n in ("liver", "lungs", "spine"))
    written = np.asarray(nib.load(result["organ-seg"]["mask"]).dataobj)
    np.testing.assert_array_equal(written, expected)
    # Assert: every liver and lung voxel of organ-seg's own head is kept
    kept = organs.numpy() > 0
    np.testing.assert_array_equal(written[kept], organs.numpy()[kept])


def test_an_extension_named_with_task_gives_its_own_map(
    exported: tuple[Path, UniconModel], scan: Path
) -> None:
    package, _ = exported
    runner = CliRunner()
    result = runner.invoke(
        app, ["--model", str(package), "--image", f"ct={scan}", "--task", "organ-spine"]
    )
    assert result.exit_code == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == {"modality", "organ-spine"}
    assert list(printed["organ-spine"]["voxels"]) == ["background", "spine"]
    assert sum(printed["organ-spine"]["voxels"].values()) == 16**3
