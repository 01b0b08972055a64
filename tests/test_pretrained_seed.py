"""A plan seeded from a pretrained file: export round trip, plan check, coordinator lineage."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from server.coordinator import Coordinator
from server.export import export_version
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.checkpoint import Lineage
from unicon_model.cli import app
from unicon_model.model import UniconModel
from unicon_model.pretrained import PretrainedError, seed_from_pretrained
from unicon_model.schema import Plan, PretrainedSpec, validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _plan(pretrained: dict[str, Any] | None = None, **stage0: Any) -> Plan:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(rounds=1, **stage0)
    if pretrained is not None:
        raw["model"] = {**raw["model"], "pretrained": pretrained}
    return validate_plan(raw)


def _random_model(plan: Plan, seed: int) -> UniconModel:
    model = UniconModel.from_plan(plan, through_stage=0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
    return model


def _encoder_file(tmp_path: Path, plan: Plan) -> tuple[Path, dict[str, torch.Tensor]]:
    """A MONAI-style encoder state dict (``encoder.`` names) saved with safetensors."""
    state = {
        "encoder." + k.removeprefix("backbone."): v.clone()
        for k, v in _random_model(plan, seed=11).state_dict().items()
        if k.startswith("backbone.")
    }
    path = tmp_path / "encoder.safetensors"
    save_file(state, path)
    return path, state


def test_seeding_from_a_registry_export_equals_the_exported_weights(tmp_path: Path) -> None:
    plan = _plan()
    source = _random_model(plan, seed=3)
    registry = Registry(tmp_path / "registry")
    version = registry.commit(source, lineage=Lineage(plan="p", stage="foundation"))
    package = export_version(registry, version, tmp_path / "export")
    for folder in (registry.version_dir(version), package):
        target = UniconModel.from_plan(plan, through_stage=0)
        seeded = seed_from_pretrained(target, PretrainedSpec(path=str(folder)))
        assert seeded.components == ("backbone", "modality/ct")
        ours, theirs = target.state_dict(), source.state_dict()
        seeded_keys = [k for k in ours if k.startswith(("backbone.", "modalities.ct."))]
        assert seeded_keys and all(torch.equal(ours[k], theirs[k]) for k in seeded_keys)


def test_plan_check_names_a_missing_pretrained_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    raw = json.loads(_plan({"path": str(missing)}).model_dump_json())
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(raw))

    result = CliRunner().invoke(app, ["plan", "check", str(plan_file)])

    assert result.exit_code == 1
    assert "model.pretrained.path" in result.output and "missing.safetensors" in result.output
    assert "does not exist" in result.output


def test_a_coordinator_run_records_the_pretrained_sha256(sites_dir: Path, tmp_path: Path) -> None:
    plan0 = _plan()
    path, state = _encoder_file(tmp_path, plan0)
    spec = {"path": str(path), "mapping": {"encoder.": "backbone."}, "components": ["backbone"]}
    # the backbone stays frozen, so the committed version must hold the file's tensors
    plan = _plan(spec, train=["modality/ct", "task/lesion-class"], validate_every=0)
    registry = Registry(tmp_path / "registry")
    # one site keeps the run short; seeding does not depend on the number of sites
    transport = InProcessTransport([sites_dir / SITES[0]], tmp_path / "site-state")

    Coordinator(plan, registry, transport, site_wait=0).run()

    (version,) = registry.versions()
    lineage = registry.manifest(version).lineage
    assert lineage.pretrained is not None
    assert lineage.pretrained.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lineage.pretrained.path == str(path.resolve())
    assert lineage.pretrained.components == ["backbone"]
    model, _ = registry.load(version)
    committed = model.state_dict()
    for name, value in state.items():
        assert torch.equal(committed[name.replace("encoder.", "backbone.", 1)], value)


@pytest.mark.parametrize("bad", ["missing", "pickled", "wrong-shape"])
def test_a_bad_pretrained_file_fails_the_run_before_anything_is_committed(
    sites_dir: Path, tmp_path: Path, bad: str
) -> None:
    path = tmp_path / "weights.pt"
    if bad == "pickled":
        torch.save(torch.nn.Linear(2, 2), path)
    elif bad == "wrong-shape":
        torch.save({"backbone.levels.0.conv.unit0.conv.weight": torch.zeros(1)}, path)
    plan = _plan({"path": str(path)})
    registry = Registry(tmp_path / "registry")
    transport = InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state")

    with pytest.raises(PretrainedError, match=re.escape(str(path))):
        Coordinator(plan, registry, transport, site_wait=0).run()

    assert registry.versions() == []
    assert registry.load_round(plan.name) is None
    assert registry.progress(plan.name).completed_stages == []


def test_resuming_the_first_stage_still_records_the_pretrained_file(tmp_path: Path) -> None:
    plan0 = _plan()
    path, _ = _encoder_file(tmp_path, plan0)
    plan = _plan({"path": str(path), "mapping": {"encoder.": "backbone."}})
    registry = Registry(tmp_path / "registry")
    crashed = _random_model(plan, seed=5)  # the round-1 checkpoint of a run that crashed
    registry.save_round(plan.name, "foundation", 1, crashed, Lineage(stage="foundation"))
    transport = InProcessTransport([], tmp_path / "site-state")
    coordinator = Coordinator(plan, registry, transport, site_wait=0)

    model, first_round = coordinator._starting_model(0)

    assert first_round == 2
    assert torch.equal(
        model.state_dict()["backbone.levels.0.conv.unit0.conv.weight"],
        crashed.state_dict()["backbone.levels.0.conv.unit0.conv.weight"],
    )
    assert coordinator.pretrained is not None
    assert coordinator.pretrained.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
