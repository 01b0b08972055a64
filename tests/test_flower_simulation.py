"""The real ServerApp and ClientApp on Flower's simulation engine (SuperLink, Ray, flwr run).

The same plan over the same sites through the in-process transport gives the same model:
the Flower path adds transport, not numerics. One stage uses SecAgg+ over the real grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.coordinator import Coordinator
from server.registry import Registry
from server.superlink import SuperLink
from simulations.flower_run import run_plan_in_simulation
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.components import select_state
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def test_flower_simulation_matches_the_in_process_run(
    sites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a secure foundation stage and a plain prognosis stage, one round each; every
    # SuperLink the run starts is remembered, to check afterwards that it was stopped
    started: list[SuperLink] = []
    original_start = SuperLink.start

    def remembering_start(self: SuperLink, timeout: float = 60.0) -> SuperLink:
        started.append(self)
        return original_start(self, timeout)

    monkeypatch.setattr(SuperLink, "start", remembering_start)
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:2]
    raw["stages"][0].update(
        rounds=1,
        min_sites=3,
        secure_aggregation=True,
        secagg={"num_shares": 3, "reconstruction_threshold": 2},
    )
    raw["stages"][1].update(rounds=1)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(raw))
    folders = [sites_dir / s for s in SITES]
    # Execute: Flower's simulation engine, then the in-process reference
    run = run_plan_in_simulation(
        plan_path,
        folders,
        registry=tmp_path / "flower-registry",
        state_root=tmp_path / "flower-state",
        work_dir=tmp_path / "flower",
        site_wait=60.0,
        timeout=400,
    )
    reference = Registry(tmp_path / "reference-registry")
    Coordinator(
        validate_plan(raw),
        reference,
        InProcessTransport(folders, tmp_path / "reference-state"),
        site_wait=0,
    ).run()
    # Assert: both versions committed with every site in the lineage, equal weights
    flower = Registry(run.registry)
    assert flower.versions() == ["v0001-foundation", "v0002-prognosis"]
    # SecAgg+ rounds stochastically (numpy's global RNG): the secure stage agrees to 0.1% of
    # that; the next stage starts from those last-bit differences, and Adam's first steps
    # (lr·sign(g) for tiny g) carry them up to the order of lr, still far below the update.
    # Frozen means no stage so far trains the component: a trained parameter whose gradient
    # is zero in exact arithmetic (the survival head's output bias: the Cox likelihood is
    # shift-invariant) may stay put in one run and move by float noise under Adam in the other.
    plan = validate_plan(raw)
    initial = UniconModel.from_plan(plan).state_dict()
    trained: list[str] = []
    versions = zip(flower.versions(), plan.stages, (1e-3, 0.1), strict=True)
    for version, stage, tolerance in versions:
        assert flower.manifest(version).lineage.sites == SITES
        trained += stage.trained_components
        model, _ = flower.load(version)
        expected, _ = reference.load(version)
        trainable = set(select_state(expected, trained))
        state = model.state_dict()
        moved, difference = 0.0, 0.0
        for key, value in expected.state_dict().items():
            change = float((value - initial[key]).abs().max())
            gap = float((state[key] - value).abs().max())
            assert key in trainable or gap == 0.0, f"{version}: frozen {key} changed"
            assert key in trainable or change == 0.0, f"{version}: frozen {key} trained"
            moved, difference = max(moved, change), max(difference, gap)
        worst = difference / moved
        assert worst < tolerance, f"{version}: Flower vs in-process differ by {worst:.2g}×update"
    secure = next(r for r in flower.metrics("tiny") if r.get("secure"))
    assert secure["stage"] == "foundation" and secure["failed"] == {}
    # the simulation SuperLink was started once and its process has exited (stopped by pid)
    assert len(started) == 1 and started[0].process is not None
    assert started[0].process.poll() is not None, "the SuperLink process is still running"
