"""The incremental analytic bench: its plan, and one tiny run against the one-stage solve."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from simulations.baseline_runs import federate
from simulations.bench_analytic_incremental import bench_incremental, incremental_plan
from tests.conftest import TINY_MODEL
from tests.conftest import sites_dir as sites_dir  # the session's tiny hospitals
from tests.test_analytic_update import HEAD
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def one_stage() -> dict[str, Any]:
    """An analytic lesion head on the (seeded, untrained) tiny encoder, one stage."""
    head = copy.deepcopy(HEAD)
    stage = {"name": "seg", "add_modalities": [{"name": "ct"}], "add_tasks": [head], "rounds": 1}
    return {
        "name": "one-stage",
        "model": TINY_MODEL,
        "data": {"patch_size": [16, 16, 16]},
        "stages": [stage],
    }


def test_the_incremental_plan_is_the_stage_then_one_update_per_further_site() -> None:
    plan = validate_plan(incremental_plan(one_stage(), 3))
    assert [s.name for s in plan.stages] == ["seg", "seg-add-2", "seg-add-3"]
    assert [s.update_analytic for s in plan.stages] == [(), ("lesion-seg",), ("lesion-seg",)]
    assert all(s.min_sites == 1 and s.is_analytic for s in plan.stages)
    assert plan.name == "one-stage-incremental"


def test_three_incremental_stages_give_the_one_stage_head(sites_dir: Path, tmp_path: Path) -> None:
    # Prepare: the one-stage solve over all three hospitals
    raw = one_stage()
    sites = [sites_dir / s for s in SITES]
    federate(raw, sites, tmp_path / "one")
    # Execute
    figures = bench_incremental(raw, sites, tmp_path, tmp_path / "one" / "registry", "lesion-seg")
    # Assert: one new hospital per stage, the same head and the same Dice
    assert figures["stage_sites"] == {
        "seg": ["hospital-a"],
        "seg-add-2": ["hospital-b"],
        "seg-add-3": ["hospital-c"],
    }
    assert figures["max_abs_difference"] <= 1e-4 and figures["met"] is True
    assert figures["dice"] == pytest.approx(figures["reference_dice"], abs=1e-6)
    assert figures["stages"] == 3
