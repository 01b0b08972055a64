"""The coordinator's stage driver over the real ClientApp (in-process, no Ray)."""

from __future__ import annotations

import dataclasses
import shutil
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from client.audit import AuditLog
from client.data import build_dataset
from client.ledger import PrivacyLedger
from client.manifest import load_manifest, manifest_yaml
from server.coordinator import Coordinator
from server.errors import StageError
from server.registry import Registry
from server.transport import Incoming, Outgoing
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.components import select_state
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def short_plan(stages: int = 3, rounds: int = 1, **stage0: Any) -> Plan:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:stages]
    for stage in raw["stages"]:
        stage["rounds"] = rounds
    raw["stages"][0].update(stage0)
    return validate_plan(raw)


def transport(sites_dir: Path, tmp_path: Path, **kwargs: Any) -> InProcessTransport:
    return InProcessTransport([sites_dir / s for s in SITES], tmp_path / "site-state", **kwargs)


def test_a_three_stage_plan_runs_to_the_end(sites_dir: Path, tmp_path: Path) -> None:
    # Prepare
    plan = short_plan(stages=3)
    registry = Registry(tmp_path / "registry")
    # Execute
    progress = Coordinator(plan, registry, transport(sites_dir, tmp_path), site_wait=0).run()
    # Assert: three versions with lineage, R rows for every learned task
    assert progress.completed_stages == ["foundation", "prognosis", "segmentation"]
    versions = registry.versions()
    assert versions == ["v0001-foundation", "v0002-prognosis", "v0003-segmentation"]
    last = registry.manifest(versions[-1])
    assert last.lineage.sites == SITES and last.lineage.parent == "v0002-prognosis"
    results = registry.results(plan.name)
    assert set(results["R"][2]) == {"lesion-class@ct", "survival@ct", "lesion-seg@ct"}
    # parameter isolation: the foundation task's metric is unchanged by later stages
    assert results["R"][2]["lesion-class@ct"] == pytest.approx(results["R"][0]["lesion-class@ct"])
    model, _ = registry.load(versions[-1])
    assert model.component_names == [
        "backbone",
        "modality/ct",
        "task/lesion-class",
        "task/survival",
        "task/lesion-seg",
    ]


class Recorder:
    """Keeps every train reply, optionally altering one site's."""

    def __init__(self, poison: dict[int, str] | None = None) -> None:
        self.train_replies: list[Incoming] = []
        self.poison = poison or {}

    def __call__(self, message: Outgoing, reply: Incoming) -> Incoming:
        if message.message_type != "train" or not reply.ok:
            return reply
        kind = self.poison.get(message.node_id)
        arrays = dict(reply.arrays)
        if kind == "nan":
            key = next(iter(arrays))
            arrays[key] = torch.full_like(arrays[key], float("nan"))
        elif kind == "huge":
            arrays = {k: v * 1e4 if v.is_floating_point() else v for k, v in arrays.items()}
        elif kind == "shape":
            key = next(iter(arrays))
            arrays[key] = torch.zeros(3, 3)
        reply = dataclasses.replace(reply, arrays=arrays)
        self.train_replies.append(reply)
        return reply


def _weighted_mean(replies: list[Incoming]) -> dict[str, torch.Tensor]:
    weights = np.array([r.metrics["num-examples"] for r in replies], dtype=np.float64)
    weights /= weights.sum()
    return {
        key: sum(
            torch.as_tensor(r.arrays[key], dtype=torch.float64) * w
            for r, w in zip(replies, weights, strict=True)
        ).float()
        for key in replies[0].arrays
    }


def test_global_model_equals_the_sample_weighted_mean_of_site_updates(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: one round of the foundation stage, every reply recorded
    plan = short_plan(stages=1)
    recorder = Recorder()
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(
        plan, registry, transport(sites_dir, tmp_path, reply_hook=recorder), site_wait=0
    ).run()
    # Assert: computed here independently from the replies
    assert len(recorder.train_replies) == 3
    expected = _weighted_mean(recorder.train_replies)
    model, _ = registry.load("v0001-foundation")
    state = select_state(model, plan.stages[0].trained_components)
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("poison", ["nan", "huge", "shape"])
def test_a_poisoned_site_is_rejected_and_the_rest_aggregate(
    sites_dir: Path, tmp_path: Path, poison: str
) -> None:
    plan = short_plan(stages=1)
    recorder = Recorder(poison={2: poison})
    registry = Registry(tmp_path / "registry")
    Coordinator(
        plan, registry, transport(sites_dir, tmp_path, reply_hook=recorder), site_wait=0
    ).run()
    honest = [r for r in recorder.train_replies if r.node_id != 2]
    expected = _weighted_mean(honest)
    model, _ = registry.load("v0001-foundation")
    state = select_state(model, plan.stages[0].trained_components)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)
    rounds = [m for m in registry.metrics(plan.name) if m["kind"] == "round"]
    assert list(rounds[0]["rejected"]) == ["hospital-b"]
    assert rounds[0]["sites"] == ["hospital-a", "hospital-c"]


class Crash(RuntimeError):
    pass


def test_kill_and_resume_continues_at_the_right_round(sites_dir: Path, tmp_path: Path) -> None:
    # Prepare: stage 2 has 3 rounds; the coordinator dies while sending round 2 of stage 2
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:2]
    raw["stages"][0]["rounds"] = 1
    raw["stages"][1]["rounds"] = 3
    raw["stages"][1]["privacy"] = {"mode": "local", "target_epsilon": 8.0}
    plan = validate_plan(raw)
    registry = Registry(tmp_path / "registry")

    def crash_at_stage2_round2(message: Outgoing, reply: Incoming) -> Incoming:
        config = message.config
        if (message.message_type, config.get("stage"), config.get("server-round")) == (
            "train",
            "prognosis",
            2,
        ):
            raise Crash("coordinator killed")
        return reply

    first = transport(sites_dir, tmp_path, reply_hook=crash_at_stage2_round2)
    with pytest.raises(Crash):
        Coordinator(plan, registry, first, site_wait=0).run()
    progress = registry.progress(plan.name)
    assert progress.completed_stages == ["foundation"]
    assert progress.current is not None and progress.current.round == 1
    # Execute: launch the same plan again
    second = transport(sites_dir, tmp_path)
    Coordinator(plan, registry, second, site_wait=0).run()
    # Assert: the foundation stage was not repeated, prognosis ran rounds 2 and 3 only
    trained = [
        (m.config["stage"], m.config["server-round"])
        for m in second.sent
        if m.message_type == "train"
    ]
    assert sorted(set(trained)) == [("prognosis", 2), ("prognosis", 3)]
    assert registry.progress(plan.name).completed_stages == ["foundation", "prognosis"]
    assert registry.manifest("v0002-prognosis").lineage.rounds == 3
    # privacy is not double-counted: the site that had answered round 2 before the crash
    # replays its stored reply; every site's ledger holds one entry per DP round
    for site in SITES:
        state = tmp_path / "site-state" / site
        entries = PrivacyLedger(state / "privacy" / "ledger.json").entries()
        assert sorted(e["round"] for e in entries) == [1, 2, 3], site
    replays = [
        e
        for e in AuditLog(tmp_path / "site-state" / SITES[0] / "audit.jsonl").entries()
        if e.event == "train-replay"
    ]
    assert [e.record["round"] for e in replays] == [2]


def test_too_few_eligible_sites_fail_with_a_clear_error(sites_dir: Path, tmp_path: Path) -> None:
    plan = short_plan(stages=1, min_sites=4)
    with pytest.raises(StageError, match="needs 4 eligible site"):
        Coordinator(
            plan, Registry(tmp_path / "r"), transport(sites_dir, tmp_path), site_wait=0
        ).run()


def test_analytic_stage_over_three_sites_equals_pooled_ridge(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: a foundation stage, then an analytic ridge head on the frozen features
    raw = tiny_plan()
    raw["stages"] = [
        *raw["stages"][:1],
        {
            "name": "ridge",
            "add_tasks": [
                {
                    "name": "lesion-class-ridge",
                    "kind": "classification",
                    "classes": ["benign", "malignant"],
                    "head": "analytic",
                    "l2": 0.5,
                }
            ],
            "rounds": 1,
        },
    ]
    plan = validate_plan(raw)
    registry = Registry(tmp_path / "registry")
    # the sites label the ridge task with the same classes as lesion-class
    for site in SITES:
        manifest_path = sites_dir / site / "manifest.yaml"
        text = manifest_path.read_text()
        copy = tmp_path / "ridge-sites" / site
        copy.mkdir(parents=True)
        for sub in ("ct", "pet", "seg"):
            if (sites_dir / site / sub).exists():
                (copy / sub).symlink_to(sites_dir / site / sub)
        import yaml

        manifest = yaml.safe_load(text)
        # a copy, not the same object: safe_dump would write a YAML alias, which manifests refuse
        manifest["tasks"]["lesion-class-ridge"] = deepcopy(manifest["tasks"]["lesion-class"])
        for case in manifest["cases"]:
            case["labels"]["lesion-class-ridge"] = case["labels"]["lesion-class"]
        (copy / "manifest.yaml").write_text(manifest_yaml(manifest))
    sites = InProcessTransport(
        [tmp_path / "ridge-sites" / s for s in SITES], tmp_path / "site-state"
    )
    # Execute
    Coordinator(plan, registry, sites, site_wait=0).run()
    # Assert: equal to sklearn's Ridge on the pooled training features of all sites
    foundation, _ = registry.load("v0001-foundation")
    features, labels = [], []
    task = plan.tasks_until(1)["lesion-class-ridge"]
    for site in SITES:
        data = build_dataset(
            load_manifest(tmp_path / "ridge-sites" / site / "manifest.yaml"),
            split="train",
            modality=plan.modalities_until(0)["ct"],
            tasks={task.name: task},
            data=plan.data,
        )
        with torch.no_grad():
            images = torch.stack([s["image"] for s in data.samples])
            features.append(foundation.pooled_features(images, modality="ct").double().numpy())
        labels += [int(s[f"{task.name}:label"]) for s in data.samples]
    x = np.concatenate(features)
    y = np.eye(2)[labels]
    reference = Ridge(alpha=0.5).fit(x, y)
    model, _ = registry.load("v0002-ridge")
    head = model.tasks["lesion-class-ridge"]
    assert isinstance(head.weight, torch.Tensor)
    np.testing.assert_allclose(head.weight.double().numpy(), reference.coef_, atol=1e-4)
    np.testing.assert_allclose(head.bias.double().numpy(), reference.intercept_, atol=1e-4)
    assert isinstance(model, UniconModel)


def test_a_site_that_lost_its_component_cache_is_sent_every_component_again(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: two one-round stages; just before the second stage's training, hospital-a
    # loses its component cache (a replaced disk, a cleanup job), while the coordinator still
    # believes it holds the first stage's components
    plan = short_plan(stages=2)
    state_root = tmp_path / "site-state"
    cache = state_root / "hospital-a" / "components"

    class LosingCache(InProcessTransport):
        train_exchanges = 0

        def exchange(self, messages: Any, *, timeout: float) -> list[Incoming]:
            if any(m.message_type == "train" for m in messages):
                self.train_exchanges += 1
                if self.train_exchanges == 2:
                    shutil.rmtree(cache)
            return super().exchange(messages, timeout=timeout)

    wire = LosingCache([sites_dir / s for s in SITES], state_root)
    registry = Registry(tmp_path / "registry")
    # Execute
    Coordinator(plan, registry, wire, site_wait=0).run()
    # Assert: hospital-a's first request of stage 2 held no backbone (cached, it was told),
    # it answered with a cache miss, and the resend held every component; the stage then
    # completed with all three sites
    to_a = [m for m in wire.sent if m.node_id == 1 and m.message_type == "train"]
    stage_two = to_a[1:]
    assert len(stage_two) == 2
    assert not any(k.startswith("backbone.") for k in stage_two[0].arrays)
    assert any(k.startswith("backbone.") for k in stage_two[1].arrays)
    assert registry.versions() == ["v0001-foundation", "v0002-prognosis"]
    assert registry.manifest("v0002-prognosis").lineage.sites == SITES
