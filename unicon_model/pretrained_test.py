"""Seeding the first stage from pretrained files: formats, mapping, refusals."""

from __future__ import annotations

import hashlib
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from unicon_model.checkpoint import save_checkpoint
from unicon_model.components import split_by_component
from unicon_model.errors import PlanError
from unicon_model.model import UniconModel
from unicon_model.pretrained import (
    PretrainedError,
    pretrained_problems,
    read_pretrained,
    seed_from_pretrained,
)
from unicon_model.schema import Plan, PretrainedSpec, plan_warnings, validate_plan

TINY = {"spatial_dims": 2, "widths": [4, 8], "adapter_rank": 2, "head_hidden": 4}


def _plan(pretrained: dict[str, Any] | None = None, train: list[str] | None = None) -> Plan:
    model: dict[str, Any] = dict(TINY)
    if pretrained is not None:
        model["pretrained"] = pretrained
    stage: dict[str, Any] = {
        "name": "first",
        "add_modalities": [{"name": "ct"}],
        "add_tasks": [{"name": "cls", "kind": "classification", "classes": ["a", "b"]}],
    }
    if train is not None:
        stage["train"] = train
    data = {"patch_size": [16, 16]}
    return validate_plan({"name": "p", "model": model, "data": data, "stages": [stage]})


def _model(seed: int = 0) -> UniconModel:
    """The first stage's model with every tensor set to seeded random values."""
    model = UniconModel.from_plan(_plan())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator))
    return model


def _backbone(model: UniconModel, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    return {
        prefix + k.removeprefix("backbone."): v.clone()
        for k, v in model.state_dict().items()
        if k.startswith("backbone.")
    }


def _equal(a: UniconModel, b: UniconModel, prefixes: tuple[str, ...]) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefixes))


def test_a_unicon_checkpoint_seeds_backbone_and_adapter_bit_for_bit(tmp_path: Path) -> None:
    source = _model(seed=1)
    folder = tmp_path / "v0001"
    save_checkpoint(folder, split_by_component(source.state_dict()), version="v1", model_config={})
    target = UniconModel.from_plan(_plan())
    head_before = target.state_dict()["tasks.cls.mlp.0.weight"].clone()

    seeded = seed_from_pretrained(target, PretrainedSpec(path=str(folder)))

    assert seeded.format == "unicon"
    assert seeded.components == ("backbone", "modality/ct")
    manifest_sha = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert seeded.sha256 == manifest_sha == seeded.record().sha256
    assert _equal(source, target, ("backbone.", "modalities.ct."))
    # the task head was not asked for and is not in the default: unchanged
    assert torch.equal(target.state_dict()["tasks.cls.mlp.0.weight"], head_before)


def test_a_torch_state_dict_with_a_mapping_loads(tmp_path: Path) -> None:
    source = _model(seed=2)
    path = tmp_path / "monai.pth"
    # a MONAI-style checkpoint: {"state_dict": {...}, "epoch": 3}, tensors only
    torch.save({"state_dict": _backbone(source, "encoder."), "epoch": 3}, path)
    spec = PretrainedSpec(path=str(path), mapping={"state_dict.encoder.": "backbone."})
    target = UniconModel.from_plan(_plan())

    seeded = seed_from_pretrained(target, spec)

    assert seeded.format == "torch" and seeded.components == ("backbone",)
    assert seeded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _equal(source, target, ("backbone.",))
    assert set(seeded.loaded_keys) == {k for k in target.state_dict() if k.startswith("backbone.")}


class Payload:
    """Any object a pickle would have to import to rebuild."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["module", "object", "raw-pickle"])
def test_a_pickled_object_file_is_refused_and_the_model_unchanged(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.pt"
    if kind == "module":
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "object":
        torch.save({"backbone.x": torch.zeros(1), "payload": Payload()}, path)
    else:
        path.write_bytes(pickle.dumps({"payload": Payload()}))
    target = UniconModel.from_plan(_plan())
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(PretrainedError) as raised:
        seed_from_pretrained(target, PretrainedSpec(path=str(path)))

    message = str(raised.value)
    assert raised.value.field == "model.pretrained.path"
    assert str(path) in message
    assert "pickled Python objects" in message and "safetensors" in message
    if kind == "module":
        assert "it needs torch.nn.modules.linear.Linear" in message
    assert "must never run" not in capsys.readouterr().out
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_a_mismatched_file_lists_missing_unexpected_and_wrong_shaped_keys(
    tmp_path: Path,
) -> None:
    state = _backbone(_model(seed=3), "encoder.")
    dropped = sorted(state)[0]
    del state[dropped]
    reshaped = sorted(state)[-1]
    state[reshaped] = torch.zeros(3, 3, 3)
    state["decoder.up.weight"] = torch.zeros(2, 2)
    path = tmp_path / "enc.safetensors"
    save_file(state, path)
    spec = PretrainedSpec(path=str(path), mapping={"encoder.": "backbone."})
    target = UniconModel.from_plan(_plan())
    before = {k: v.clone() for k, v in target.state_dict().items()}

    with pytest.raises(PretrainedError) as raised:
        seed_from_pretrained(target, spec)

    message = str(raised.value)
    assert str(path) in message and raised.value.field == "model.pretrained.mapping"
    assert "1 missing key(s)" in message and dropped.replace("encoder.", "backbone.") in message
    assert "1 unexpected key(s)" in message and "decoder.up.weight (2, 2)" in message
    assert "1 wrong-shaped key(s)" in message and "file (3, 3, 3)" in message
    assert "strict = false" in message and "mapping" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_non_strict_loads_the_matching_keys_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = _model(seed=4)
    state = _backbone(source, "encoder.")
    dropped = sorted(state)[0]
    del state[dropped]
    path = tmp_path / "enc.safetensors"
    save_file(state, path)
    spec = PretrainedSpec(path=str(path), mapping={"encoder.": "backbone."}, strict=False)
    target = UniconModel.from_plan(_plan())

    with caplog.at_level(logging.WARNING, logger="unicon_model.pretrained"):
        seeded = seed_from_pretrained(target, spec)

    assert len(seeded.loaded_keys) == len(state) and len(seeded.skipped) == 1
    assert "missing key(s)" in caplog.text
    ours = {k.replace("encoder.", "backbone."): v for k, v in state.items()}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in ours.items())


def test_ignore_skips_tensors_a_strict_spec_would_refuse(tmp_path: Path) -> None:
    state = {**_backbone(_model(seed=5)), "decoder.w": torch.zeros(2)}
    path = tmp_path / "net.safetensors"
    save_file(state, path)
    target = UniconModel.from_plan(_plan())
    seeded = seed_from_pretrained(target, PretrainedSpec(path=str(path), ignore=("decoder.",)))
    assert seeded.components == ("backbone",) and not seeded.skipped


def test_missing_too_large_pinned_and_non_finite_files_are_refused(tmp_path: Path) -> None:
    target = UniconModel.from_plan(_plan())
    with pytest.raises(
        PretrainedError, match=r"model\.pretrained\.path: .*nope\.pt does not exist"
    ):
        seed_from_pretrained(target, PretrainedSpec(path=str(tmp_path / "nope.pt")))
    path = tmp_path / "b.safetensors"
    save_file(_backbone(_model(seed=6)), path)
    with pytest.raises(PretrainedError, match="more than the 100 bytes"):
        seed_from_pretrained(target, PretrainedSpec(path=str(path)), max_bytes=100)
    with pytest.raises(PretrainedError, match=r"model\.pretrained\.sha256: .*not the pinned"):
        seed_from_pretrained(target, PretrainedSpec(path=str(path), sha256="0" * 64))
    bad = _backbone(_model(seed=6))
    next(iter(bad.values())).view(-1)[0] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors")
    with pytest.raises(PretrainedError, match="NaN or Inf"):
        seed_from_pretrained(target, PretrainedSpec(path=str(tmp_path / "nan.safetensors")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(PretrainedError, match="not a valid safetensors file"):
        seed_from_pretrained(target, PretrainedSpec(path=str(tmp_path / "junk.safetensors")))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(PretrainedError, match=r"model\.pretrained\.format"):
        seed_from_pretrained(target, PretrainedSpec(path=str(tmp_path / "w.npz")))


def test_a_tampered_unicon_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "v"
    save_checkpoint(folder, split_by_component(_model().state_dict()), version="v")
    tensor_file = folder / "backbone.safetensors"
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(PretrainedError, match=r"sha256 .* does not match"):
        seed_from_pretrained(UniconModel.from_plan(_plan()), PretrainedSpec(path=str(folder)))


def test_relative_paths_resolve_against_the_base_dir(tmp_path: Path) -> None:
    save_file(_backbone(_model()), tmp_path / "b.safetensors")
    path, kind, _, tensors = read_pretrained(PretrainedSpec(path="b.safetensors"), tmp_path)
    assert path == (tmp_path / "b.safetensors").resolve() and kind == "safetensors"
    assert tensors


def test_plan_fields_are_validated_with_their_path() -> None:
    with pytest.raises(PlanError) as raised:
        _plan({"path": "", "components": ["backbone", "heads/x"], "sha256": "xyz"})
    text = str(raised.value)
    for field in ("path", "components", "sha256"):
        assert f"model.pretrained.{field}" in text


def test_a_pretrained_backbone_silences_the_frozen_encoder_warning(tmp_path: Path) -> None:
    assert plan_warnings(_plan(train=["task/cls"]))  # random, frozen encoder
    assert not plan_warnings(_plan({"path": "b.safetensors"}, train=["task/cls"]))
    only_adapter = _plan({"path": "b.safetensors", "components": ["modality/ct"]}, ["task/cls"])
    assert plan_warnings(only_adapter)


def test_pretrained_problems_name_the_field(tmp_path: Path) -> None:
    assert pretrained_problems(_plan()) == []
    problems = pretrained_problems(_plan({"path": str(tmp_path / "none.pt")}))
    assert len(problems) == 1 and problems[0].startswith("model.pretrained.path: ")
    save_file(_backbone(_model()), tmp_path / "b.safetensors")
    assert pretrained_problems(_plan({"path": "b.safetensors"}), tmp_path) == []
    wrong = _plan({"path": "b.safetensors", "components": ["modality/pet"]})
    assert pretrained_problems(wrong, tmp_path)[0].startswith("model.pretrained.components: ")
