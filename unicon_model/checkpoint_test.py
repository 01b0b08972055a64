"""Checkpoint format: round trip, integrity checks, atomic replacement, digests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unicon_model.checkpoint import (
    FORMAT,
    CheckpointError,
    Lineage,
    component_file_name,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    tensor_digest,
    verify_checkpoint,
)
from unicon_model.components import split_by_component
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, TaskSpec


def small_model() -> UniconModel:
    model = UniconModel(ModelSpec(widths=[4, 8], seed=3))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_modality(ModalitySpec(name="pet"))
    model.add_task(TaskSpec(name="lesion-class", kind="classification", classes=["a", "b"]))
    return model


def test_round_trip_rebuilds_an_identical_model(tmp_path: Path) -> None:
    model = small_model()
    lineage = Lineage(
        plan="p",
        stage="foundation",
        stage_index=0,
        sites=["a", "b"],
        rounds=3,
        epsilon={"a": 1.5},
        metrics={"lesion-class@ct/auc": 0.8},
    )
    written = save_checkpoint(
        tmp_path / "v1",
        split_by_component(model.state_dict()),
        version="v1",
        model_config=model.config(),
        lineage=lineage,
    )
    manifest, components = load_checkpoint(tmp_path / "v1")
    assert manifest == written
    assert manifest.format == FORMAT
    assert manifest.lineage.epsilon == {"a": 1.5}
    assert set(manifest.components) == {
        "backbone",
        "modality/ct",
        "modality/pet",
        "task/lesion-class",
    }
    assert (tmp_path / "v1" / "modality--pet.safetensors").exists()
    rebuilt = UniconModel.from_config(manifest.model_config_)
    rebuilt.load_state_dict({k: v for c in components.values() for k, v in c.items()})
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert manifest.parameters == sum(v.numel() for v in model.state_dict().values())
    raw = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    assert "model_config" in raw and "model_config_" not in raw


def test_subset_load_and_unknown_component(tmp_path: Path) -> None:
    model = small_model()
    save_checkpoint(tmp_path / "c", split_by_component(model.state_dict()), version="c")
    _, only = load_checkpoint(tmp_path / "c", ["modality/pet"])
    assert list(only) == ["modality/pet"]
    with pytest.raises(CheckpointError, match="no component"):
        load_checkpoint(tmp_path / "c", ["task/missing"])


def test_a_modified_file_is_refused(tmp_path: Path) -> None:
    model = small_model()
    save_checkpoint(tmp_path / "c", split_by_component(model.state_dict()), version="c")
    path = tmp_path / "c" / component_file_name("task/lesion-class")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "c")
    problems = verify_checkpoint(tmp_path / "c")
    assert len(problems) == 1 and "task--lesion-class" in problems[0]
    # the untouched components still load
    load_checkpoint(tmp_path / "c", ["backbone"])


def test_malformed_manifests_are_refused(tmp_path: Path) -> None:
    model = small_model()
    save_checkpoint(tmp_path / "c", split_by_component(model.state_dict()), version="c")
    path = tmp_path / "c" / "manifest.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "format": "pickle/0"}))
    with pytest.raises(CheckpointError, match="format"):
        read_manifest(tmp_path / "c")
    raw["components"]["backbone"]["file"] = "../../etc/passwd"
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"expected 'backbone\.safetensors'"):
        read_manifest(tmp_path / "c")
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_manifest(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_manifest(tmp_path / "missing")


def test_save_replaces_atomically_and_a_failed_save_keeps_the_old(tmp_path: Path) -> None:
    first = {"backbone": {"backbone.w": torch.ones(3)}}
    save_checkpoint(tmp_path / "c", first, version="one")

    class Boom(dict[str, torch.Tensor]):
        def items(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path / "c", {"backbone": Boom()}, version="two")
    manifest, components = load_checkpoint(tmp_path / "c")
    assert manifest.version == "one"
    assert torch.equal(components["backbone"]["backbone.w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    save_checkpoint(tmp_path / "c", {"backbone": {"backbone.w": torch.zeros(2)}}, version="two")
    manifest, components = load_checkpoint(tmp_path / "c")
    assert manifest.version == "two" and components["backbone"]["backbone.w"].shape == (2,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_tensor_digest_depends_on_content_only() -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest({"x": a}) == tensor_digest({"x": a.t().contiguous().t()})
    assert tensor_digest({"x": a, "y": a}) == tensor_digest({"y": a.clone(), "x": a.clone()})
    assert tensor_digest({"x": a}) != tensor_digest({"x": a.reshape(4, 3)})
    assert tensor_digest({"x": a}) != tensor_digest({"x": a.double()})
    assert tensor_digest({"x": a}) != tensor_digest({"z": a})
    b = a.clone()
    b[2, 3] += 1e-6
    assert tensor_digest({"x": a}) != tensor_digest({"x": b})


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a\\b"])
def test_component_names_cannot_escape(bad: str) -> None:
    with pytest.raises(CheckpointError):
        component_file_name(bad)
