"""Where the time of a round goes: the breakdown in every round record adds up to its wall."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from client import timing
from server.coordinator import Coordinator
from server.registry import Registry
from server.timing import PhaseClock
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b"]


@pytest.fixture(scope="module")
def rounds(sites_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:1]
    raw["stages"][0].update(rounds=2, min_sites=2)
    plan = validate_plan(raw)
    work = tmp_path_factory.mktemp("timing")
    registry = Registry(work / "registry")
    transport = InProcessTransport([sites_dir / s for s in SITES], work / "state")
    Coordinator(plan, registry, transport, site_wait=0).run()
    return list(registry.metrics(plan.name))


def test_the_coordinator_phases_add_up_to_the_round_wall_time_within_5_percent(
    rounds: list[dict],
) -> None:
    records = [r for r in rounds if r["kind"] == "round"]
    assert len(records) == 2
    for record in records:
        breakdown = record["timing"]
        wall = record["wall_s"]
        assert breakdown["wall_s"] == wall
        phases = breakdown["coordinator"]
        assert {"request_s", "train_wait_s", "aggregation_s", "update_check_s"} <= set(phases)
        assert {"evaluate_wait_s", "validation_s", "checkpoint_s"} <= set(phases)
        assert all(v >= 0 for v in phases.values())
        assert sum(phases.values()) == pytest.approx(wall, rel=0.05)
        assert abs(breakdown["unaccounted_s"]) <= 0.05 * wall


def test_every_site_reports_its_phases_and_they_fit_inside_the_coordinators_wait(
    rounds: list[dict],
) -> None:
    for record in (r for r in rounds if r["kind"] == "round"):
        breakdown = record["timing"]
        assert sorted(breakdown["sites"]) == SITES
        for phases in breakdown["sites"].values():
            assert {"data_s", "model_s", "train_s", "persist_s"} <= set(phases)
            assert {"decode_s", "encode_s", "other_s", "dp_s"} <= set(phases)
        # a site whose val split is below its minimum evaluates nothing (and reports no eval)
        assert any("eval_s" in phases for phases in breakdown["sites"].values())
        # the in-process engine serves the sites one after another inside the waits
        waits = (
            breakdown["coordinator"]["train_wait_s"] + breakdown["coordinator"]["evaluate_wait_s"]
        )
        assert sum(breakdown["sites_s"].values()) <= waits
        # round 1 preprocesses every case; round 2 finds them all in the cache
        counts = breakdown["counts"]
        if record["round"] == 2:
            assert all(c["data_cache_misses"] == 0 for c in counts.values())
            assert all(c["data_cache_hits"] > 0 for c in counts.values())
        else:
            assert all(c["data_cache_misses"] > 0 for c in counts.values())


def test_the_stage_records_selection_evaluation_and_commit(rounds: list[dict]) -> None:
    (stage,) = [r for r in rounds if r["kind"] == "stage_timing"]
    assert set(stage["selection"]["coordinator"]) == {"selection_s"}
    assert {"evaluation_s", "commit_s"} <= set(stage["finish"]["coordinator"])
    assert abs(stage["finish"]["unaccounted_s"]) <= 0.05 * stage["finish"]["wall_s"] + 1e-3
    walls = sum(r["wall_s"] for r in rounds if r["kind"] == "round")
    assert stage["wall_s"] >= walls


def test_the_phase_clock_counts_a_nested_phase_once() -> None:
    clock = PhaseClock()
    with clock.phase("outer"):
        time.sleep(0.01)
        with clock.phase("inner"):
            time.sleep(0.02)
    assert clock.seconds["inner"] >= 0.02
    assert 0.01 <= clock.seconds["outer"] < 0.02 + 0.01
    summary = clock.summary(clock.seconds["inner"] + clock.seconds["outer"])
    assert summary["unaccounted_s"] == pytest.approx(0.0, abs=1e-9)


def test_a_sites_timing_that_is_not_a_number_is_ignored() -> None:
    clock = PhaseClock()
    clock.add_site("a", {"time/train_s": 1.5, "time/eval_s": float("nan"), "loss": 3.0})
    clock.add_site("a", {"time/train_s": -1.0, "time/data_s": True, "count/data_cache_hits": 2})
    clock.add_site("a", {"time/train_s": 0.5})
    assert clock.sites == {"a": {"train": 2.0}}
    assert clock.counts == {"a": {"data_cache_hits": 2.0}}


def test_site_timing_helpers_are_inert_outside_a_request_and_reentrant_inside() -> None:
    with timing.phase("train"):
        pass  # no request being served: nothing recorded, nothing raised
    with timing.recording() as outer:
        with timing.phase("data"):
            pass
        with timing.recording() as inner:
            timing.count("data_cache_hits", 3)
        assert inner is outer
    values = timing.metrics(outer)
    assert set(values) == {"time/data_s", "count/data_cache_hits"}
    assert timing.without_timing({**values, "loss": 1.0}) == {"loss": 1.0}
