"""``unicon predict`` on a tiny exported model gives what :class:`Predictor` gives directly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from client.inference import Predictor
from client.predict import app, parse_clinical, parse_pairs
from server.export import export_version
from server.registry import Registry
from unicon_model.checkpoint import Lineage
from unicon_model.model import UniconModel
from unicon_model.schema import DataSpec, ModalitySpec, ModelSpec, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported package of a 16³ model with a classifier, a survival and a seg head."""
    root = tmp_path_factory.mktemp("predict")
    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), head_hidden=8, seed=3))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="lesion", kind="classification", classes=("benign", "bad")))
    model.add_task(TaskSpec(name="survival", kind="survival", covariates=("age", "stage")))
    model.add_task(TaskSpec(name="seg", kind="segmentation", labels=("background", "tumour")))
    registry = Registry(root / "registry")
    version = registry.commit(
        model,
        lineage=Lineage(plan="tiny", stage="foundation", sites=["hospital-a"], rounds=1),
        data=DataSpec(patch_size=(16, 16, 16)),
    )
    return export_version(registry, version, root / "package")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("case") / "ct.nii.gz"
    volume = np.random.default_rng(0).normal(0.0, 300.0, (16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(path))
    return path


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_predict_prints_what_the_predictor_returns(package: Path, scan: Path) -> None:
    code, out, err = _invoke(
        "--model",
        str(package / "model"),
        "--image",
        f"ct={scan}",
        "--clinical",
        "age=64",
        "--clinical",
        "stage=2",
    )
    assert code == 0, err
    printed = json.loads(out)
    direct = Predictor(package / "model").predict(
        {"ct": scan}, clinical={"age": 64.0, "stage": 2.0}
    )
    assert printed == direct
    assert set(printed) == {"modality", "lesion", "survival", "seg"}
    assert printed["modality"] == "ct"
    assert sum(printed["lesion"]["probabilities"].values()) == pytest.approx(1.0)
    assert sum(printed["seg"]["voxels"].values()) == 16**3


def test_predict_writes_the_same_mask_as_the_predictor(
    package: Path, scan: Path, tmp_path: Path
) -> None:
    code, out, err = _invoke(
        "--model",
        str(package / "model"),
        "--image",
        f"ct={scan}",
        "--task",
        "seg",
        "--task",
        "lesion",
        "--mask-out",
        str(tmp_path / "cli" / "case.nii.gz"),
    )
    assert code == 0, err
    printed = json.loads(out)
    direct = Predictor(package / "model").predict(
        {"ct": scan}, tasks=["seg", "lesion"], mask_out=tmp_path / "direct" / "case.nii.gz"
    )
    assert set(printed) == {"modality", "seg", "lesion"}  # only the tasks asked for
    assert printed["lesion"] == direct["lesion"]
    assert printed["seg"]["voxels"] == direct["seg"]["voxels"]
    assert printed["seg"]["mask"] == str(tmp_path / "cli" / "case-seg.nii.gz")
    written = np.asarray(nib.load(printed["seg"]["mask"]).dataobj)
    reference = np.asarray(nib.load(direct["seg"]["mask"]).dataobj)
    assert written.shape == (16, 16, 16)
    np.testing.assert_array_equal(written, reference)
    assert int((written == 1).sum()) == printed["seg"]["voxels"]["tumour"]


def test_the_exported_launcher_passes_its_options_on(package: Path, scan: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(package / "predict.py"), "--image", f"ct={scan}", "--task", "lesion"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    direct = Predictor(package / "model").predict({"ct": scan}, tasks=["lesion"])
    assert json.loads(completed.stdout) == direct
    launcher = (package / "predict.py").read_text()
    assert "from client.predict import main" in launcher
    assert "pip install unicon" not in (package / "README.md").read_text()
    assert "unicon predict --model model" in (package / "README.md").read_text()


def test_problems_exit_1_and_malformed_options_exit_2(package: Path, scan: Path) -> None:
    model = str(package / "model")
    code, out, err = _invoke("--model", model, "--image", f"ct={scan}", "--task", "nope")
    assert code == 1 and out == ""
    assert "unknown task(s) ['nope']" in err
    code, _, err = _invoke("--model", model, "--image", f"ct={scan}", "--task", "survival")
    assert code == 1 and "needs clinical covariates ['age', 'stage']" in err
    code, _, err = _invoke("--model", str(package), "--image", f"ct={scan}")
    assert code == 1 and "manifest.json does not exist" in err
    code, _, err = _invoke("--model", model, "--image", str(scan))
    assert code == 2 and "expected KEY=VALUE" in err
    code, _, err = _invoke("--model", model, "--image", f"ct={scan}", "--clinical", "age=old")
    assert code == 2 and "not a number" in err
    code, _, _ = _invoke("--model", model)
    assert code == 2  # --image is required


def test_pairs_parse_key_value() -> None:
    assert parse_pairs(["ct=a.nii.gz", "pet=b=c.nii"], "--image") == {
        "ct": "a.nii.gz",
        "pet": "b=c.nii",
    }
    assert parse_pairs(None, "--image") == {}
    assert parse_clinical(["age=64", "stage=2.5"]) == {"age": 64.0, "stage": 2.5}
    with pytest.raises(typer.BadParameter, match="expected KEY=VALUE"):
        parse_pairs(["=x"], "--clinical")


def test_a_pet_ct_case_is_classified_by_the_ct_route_when_no_stage_trained_pet_for_it(
    tmp_path: Path, scan: Path
) -> None:
    # Prepare: CT classification and segmentation, then a PET-CT modality trained for
    # segmentation only; every weight perturbed, so the PET adapters differ from the CT ones
    import torch

    from unicon_model.schema import StageSpec

    model = UniconModel(ModelSpec(spatial_dims=3, widths=(4, 8), head_hidden=8, seed=3))
    lesion = TaskSpec(name="lesion", kind="classification", classes=("benign", "bad"))
    seg = TaskSpec(name="seg", kind="segmentation", labels=("background", "tumour"))
    model.grow(
        StageSpec(name="s1", add_modalities=(ModalitySpec(name="ct"),), add_tasks=(lesion, seg))
    )
    pet = ModalitySpec(name="pet", inputs=("ct", "pet"), init_from="ct")
    model.grow(StageSpec(name="s2", add_modalities=(pet,), objectives=("seg",)))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    registry = Registry(tmp_path / "registry")
    version = registry.commit(
        model,
        lineage=Lineage(plan="tiny", stage="s2", sites=["hospital-a"], rounds=1),
        data=DataSpec(patch_size=(16, 16, 16)),
    )
    predictor = Predictor(export_version(registry, version, tmp_path / "package") / "model")
    pet_path = tmp_path / "pet.nii.gz"
    uptake = np.random.default_rng(1).gamma(2.0, 1.0, (16, 16, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(uptake, np.eye(4)), str(pet_path))
    # Execute
    both = predictor.predict({"ct": scan, "pet": pet_path})
    ct_only = predictor.predict({"ct": scan})
    predictor.model.trained_routes = None  # as an export from before routes were recorded
    zero_shot = predictor.predict({"ct": scan, "pet": pet_path})
    # Assert: the PET-CT case takes the pet route, whose classification is the CT route's;
    # the PET adapters' own (untrained) classification would differ
    assert (both["modality"], ct_only["modality"]) == ("pet", "ct")
    assert both["lesion"] == ct_only["lesion"]
    assert zero_shot["lesion"] != ct_only["lesion"]
