"""A federated segmentation stage with task LoRA: earlier routes unchanged, deltas committed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.inference import Predictor
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.components import split_by_component
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b"]  # two are enough for SecAgg+, and faster


def test_a_lora_segmentation_stage_keeps_earlier_routes_and_commits_its_deltas(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: an analytic classification stage (cheap: one pass, no training), then
    # segmentation with rank-2 deltas under secure aggregation, one round
    raw = tiny_plan()
    raw["stages"] = [raw["stages"][0], raw["stages"][2]]
    raw["stages"][0]["add_tasks"][0]["head"] = "analytic"
    del raw["stages"][0]["train"]
    for stage in raw["stages"]:
        stage.update(rounds=1, validate_every=0)
    raw["stages"][1]["add_tasks"][0]["lora_rank"] = 2
    raw["stages"][1].update(
        secure_aggregation=True,
        min_sites=2,
        secagg={"num_shares": 2, "reconstruction_threshold": 2},
    )
    plan = validate_plan(raw)
    registry = Registry(tmp_path / "registry")
    transport = InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state")
    # Execute
    Coordinator(plan, registry, transport, site_wait=0).run()
    # Assert: the foundation's R entry is unchanged and its route computes the same outputs
    results = registry.results(plan.name)
    first, last = results["R"][0]["lesion-class@ct"], results["R"][1]["lesion-class@ct"]
    assert last == pytest.approx(first, abs=1e-6)
    versions = registry.versions()
    foundation, _ = registry.load(versions[0])
    segmentation, manifest = registry.load(versions[1])
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            foundation.eval()(x, modality="ct", task="lesion-class"),
            segmentation.eval()(x, modality="ct", task="lesion-class"),
        )
    # the deltas were trained, aggregated and committed in task/lesion-seg
    deltas = split_by_component(segmentation.state_dict())["task/lesion-seg"]
    ups = [v for k, v in deltas.items() if ".lora." in k and ".up." in k]
    assert len(ups) == 6 and any(v.abs().sum() > 0 for v in ups)
    assert "task/lesion-seg" in manifest.components
    # the predictor of the committed version applies them on lesion-seg@ct
    predictor = Predictor(registry.version_dir(versions[1]), device="cpu")
    with torch.no_grad():
        routed = predictor.model(x, modality="ct", task="lesion-seg")
        plain_features = predictor.model.encode(x, modality="ct")
        plain = predictor.model.tasks["lesion-seg"](plain_features)
        assert torch.equal(routed, segmentation(x, modality="ct", task="lesion-seg"))
    assert not torch.equal(routed, plain)
