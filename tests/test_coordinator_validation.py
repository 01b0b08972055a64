"""Per-round validation: the best round is committed, patience stops a stage, resume keeps it.

The sites' ``val`` metrics are scripted through the in-process transport's reply hook, so
which round is best does not depend on how well two rounds of a tiny model learn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from server.best_round import BestRound
from server.coordinator import Coordinator
from server.registry import Registry
from server.results import AGGREGATION
from server.transport import Incoming, Outgoing
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model import protocol
from unicon_model.components import select_state
from unicon_model.schema import Plan, validate_plan

SITES = ["hospital-a", "hospital-b"]  # two sites keep these tests fast
COLUMN = "lesion-class@ct"
METRIC = protocol.metric_key("lesion-class", "ct", "accuracy")
COUNT = protocol.metric_key("lesion-class", "ct", "n")


class Crash(RuntimeError):
    pass


def one_stage(rounds: int, **stage: Any) -> Plan:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(rounds=rounds, **stage)
    return validate_plan(raw)


class ScriptedValidation:
    """Replaces every site's val accuracy of round r by ``scores[r]`` (``None``: withheld).

    Keeps the trained components each validation request carried (the model after that
    round), and raises :class:`Crash` at the train request of ``crash_at`` if set.
    """

    def __init__(
        self,
        scores: dict[int, float | None],
        crash_at: int | None = None,
        withheld: frozenset[tuple[int, int]] = frozenset(),
    ) -> None:
        self.scores = scores
        self.crash_at = crash_at
        self.withheld = withheld  # (round, node) pairs whose site reports no val metric
        self.models: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, message: Outgoing, reply: Incoming) -> Incoming:
        round_ = int(message.config.get(protocol.KEY_ROUND, 0))
        if message.message_type == "train" and round_ == self.crash_at:
            raise Crash("coordinator killed")
        if message.message_type != "evaluate" or message.config[protocol.KEY_SPLIT] != "val":
            return reply
        if message.arrays:  # copies: the coordinator's tensors change in place later
            self.models[round_] = {k: v.clone() for k, v in message.arrays.items()}
        metrics = {k: v for k, v in reply.metrics.items() if protocol.parse_metric_key(k) is None}
        score = self.scores.get(round_)
        if score is not None and (round_, message.node_id) not in self.withheld:
            metrics.update({METRIC: score, COUNT: 1.0})
        return dataclasses.replace(reply, metrics=metrics)


def run(plan: Plan, sites_dir: Path, tmp: Path, hook: ScriptedValidation) -> InProcessTransport:
    sites = InProcessTransport([sites_dir / s for s in SITES], tmp / "site-state", reply_hook=hook)
    Coordinator(plan, Registry(tmp / "registry"), sites, site_wait=0).run()
    return sites


def rounds_of(registry: Registry, plan: Plan) -> list[dict[str, Any]]:
    return [m for m in registry.metrics(plan.name) if m["kind"] == "round"]


def trained(transport: InProcessTransport) -> list[int]:
    return [int(m.config[protocol.KEY_ROUND]) for m in transport.sent if m.message_type == "train"]


def assert_committed_equals(registry: Registry, plan: Plan, expected: dict[str, torch.Tensor]):
    model, manifest = registry.load(registry.versions()[-1])
    state = select_state(model, plan.stages[0].trained_components)
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    return manifest


def test_the_best_validated_round_is_committed_and_survives_a_kill_and_resume(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: three rounds whose scripted val accuracy peaks at round 2 (hospital-b withholds
    # round 1's, as a site does below min_evaluation_cases); the coordinator dies sending
    # round 3
    plan = one_stage(rounds=3, local_epochs=1, patience=1)
    first = ScriptedValidation({1: 0.5, 2: 0.9}, crash_at=3, withheld=frozenset({(1, 2)}))
    with pytest.raises(Crash):
        run(plan, sites_dir, tmp_path, first)
    registry = Registry(tmp_path / "registry")
    progress = registry.progress(plan.name)
    assert progress.current is not None and progress.current.round == 2
    assert (tmp_path / "registry" / "runs" / plan.name / "best-2").is_dir()
    # Execute: relaunch; only round 3 runs, and it validates worse than round 2
    second = ScriptedValidation({3: 0.6})
    sites = run(plan, sites_dir, tmp_path, second)
    # Assert: round 2's model (kept from before the crash) is committed, not round 3's
    assert sorted(set(trained(sites))) == [3]
    manifest = assert_committed_equals(registry, plan, first.models[2])
    assert any(not torch.equal(second.models[3][k], v) for k, v in first.models[2].items())
    assert manifest.lineage.metrics["val/kept_round"] == 2
    assert manifest.lineage.metrics["val/score"] == pytest.approx(0.9)
    assert manifest.lineage.rounds == 3
    records = rounds_of(registry, plan)
    assert [r["val_score"] for r in records] == pytest.approx([0.5, 0.9, 0.6])
    assert records[0]["val"]["per_site"] == {"hospital-a": {COLUMN: 0.5}, "hospital-b": {}}
    assert records[1]["val"]["case_weighted_mean"] == {COLUMN: pytest.approx(0.9)}
    # the best round and patience were restored: round 3 is the one miss patience allows
    assert [r["best_round"] for r in records] == [1, 2, 2]
    assert records[-1]["stopped_early"] is True
    # the kept round's checkpoint is gone once the stage is committed
    assert not list((tmp_path / "registry" / "runs" / plan.name).glob("*best-*"))
    assert registry.results(plan.name)["R_aggregation"] == AGGREGATION


def test_patience_stops_the_stage_and_a_round_without_metrics_is_no_miss(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: four rounds, patience 1; every site withholds round 2's metrics, round 3 is
    # worse than round 1
    plan = one_stage(rounds=4, local_epochs=1, patience=1)
    hook = ScriptedValidation({1: 0.8, 3: 0.7, 4: 0.9})
    # Execute
    sites = run(plan, sites_dir, tmp_path, hook)
    # Assert: round 4 never ran; round 1 is committed
    assert sorted(set(trained(sites))) == [1, 2, 3]
    registry = Registry(tmp_path / "registry")
    records = rounds_of(registry, plan)
    assert [r["val_score"] for r in records] == [0.8, None, 0.7]
    assert [r.get("stopped_early") for r in records] == [None, None, True]
    manifest = assert_committed_equals(registry, plan, hook.models[1])
    assert manifest.lineage.metrics["val/kept_round"] == 1 and manifest.lineage.rounds == 3


def test_best_round_tracking_counts_misses_and_round_trips_through_lineage_metrics() -> None:
    best = BestRound()
    assert best.update(1, None, 0.0) is False and best.since == 0  # withheld: not a miss
    assert best.update(2, 0.5, 0.0) is True and (best.round, best.since) == (2, 0)
    # a gain below min_delta is kept but counts as a miss for patience
    assert best.update(3, 0.55, 0.1) is True and (best.round, best.since) == (3, 1)
    assert best.update(4, 0.7, 0.1) is True and (best.round, best.since) == (4, 0)
    # a tie keeps the later round and is a miss; a worse round is not kept
    assert best.update(5, 0.7, 0.0) is True and (best.round, best.since) == (5, 1)
    assert best.update(6, 0.6, 0.0) is False and (best.round, best.since) == (5, 2)
    restored = BestRound.from_metrics(best.to_metrics())
    assert (restored.round, restored.score, restored.since) == (5, 0.7, 2)
    # a checkpoint without (or with nonsense) tracking metrics restarts the tracking
    assert BestRound.from_metrics({"val/best_round": float("nan")}) == BestRound()
