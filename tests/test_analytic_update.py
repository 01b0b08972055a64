"""Incremental analytic stages (issue 13, item 1): new hospitals' statistics added over three
stages equal one solve on every hospital's data, without revisiting old data.

A foundation round trains the encoder on all three synthetic sites; then ``seg-a`` fits an
analytic lesion head on hospital A alone (only A is connected), ``seg-b`` adds hospital B's
statistics (``update_analytic``; A, already counted, is refused) and ``seg-c`` hospital C's.
The head after ``seg-c`` equals the ridge solve of the three sites' statistics pooled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.coordinator import Coordinator
from server.eligibility import check_site
from server.errors import StageError
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from tests.conftest import tiny_plan
from tests.test_analytic_segmentation import pooled_statistics
from unicon_model.analytic import (
    AnalyticSegmentationHead,
    merge_statistics,
)
from unicon_model.errors import PlanError
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]
HEAD = {
    "name": "lesion-seg",
    "kind": "segmentation",
    "labels": ["background", "tumour"],
    "head": "analytic",
    "analytic_features": ["intensity", "squares"],
    "foreground_prior": 0.1,
    "l2": 0.1,
}


def incremental_raw() -> dict[str, Any]:
    """Foundation (1 round), the head on one site, then two update stages."""
    raw = tiny_plan()
    raw["name"] = "incremental"
    raw["stages"] = [
        {**raw["stages"][0], "rounds": 1, "min_sites": 3},
        {"name": "seg-a", "add_tasks": [HEAD], "rounds": 1},
        {"name": "seg-b", "update_analytic": ["lesion-seg"], "rounds": 1},
        {"name": "seg-c", "update_analytic": ["lesion-seg"], "rounds": 1},
    ]
    return raw


def test_three_incremental_stages_equal_one_solve_on_every_sites_data(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    plan = validate_plan(incremental_raw())
    registry = Registry(tmp_path / "registry")
    state = tmp_path / "site-state"

    def coordinator(sites: list[str]) -> Coordinator:
        transport = InProcessTransport([sites_dir / s for s in sites], state)
        return Coordinator(plan, registry, transport, site_wait=0)

    # Execute: the foundation on all, then one more hospital connected at each stage
    coordinator(SITES).run(only_stage="foundation")
    coordinator(SITES[:1]).run(only_stage="seg-a")
    coordinator(SITES[:2]).run(only_stage="seg-b")
    progress = coordinator(SITES).run(only_stage="seg-c")
    # Assert: each stage aggregated exactly the one new hospital
    assert progress.completed_stages == ["foundation", "seg-a", "seg-b", "seg-c"]
    rounds = [r for r in registry.metrics(plan.name) if r["kind"] == "round"]
    assert [(r["stage"], r["sites"]) for r in rounds[1:]] == [
        ("seg-a", ["hospital-a"]),
        ("seg-b", ["hospital-b"]),
        ("seg-c", ["hospital-c"]),
    ]
    # Assert: the head equals the pooled solve of the three sites' statistics
    foundation, _ = registry.load("v0001-foundation")
    model, _ = registry.load("v0004-seg-c")
    head = model.tasks["lesion-seg"]
    assert isinstance(head, AnalyticSegmentationHead)
    per_site = pooled_statistics(plan, foundation, model, [sites_dir / s for s in SITES])
    pooled = merge_statistics(per_site).solution(l2=0.1, bias_column=True)
    difference = float(np.abs(head.weight.double().numpy().T - pooled.weight).max())
    assert difference <= 1e-4, difference
    np.testing.assert_allclose(head.bias.double().numpy(), pooled.bias, atol=1e-4)
    assert head.stored_statistics().count == sum(s.count for s in per_site)
    # the first stage's head was A's alone: the updates changed it
    first, _ = registry.load("v0002-seg-a")
    alone = merge_statistics(per_site[:1]).solution(l2=0.1, bias_column=True)
    np.testing.assert_allclose(first.tasks["lesion-seg"].weight.double().numpy().T,
                               alone.weight, atol=1e-4)  # fmt: skip
    assert not np.allclose(alone.weight, pooled.weight, atol=1e-3)
    # the encoder never moved
    for key, value in foundation.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_an_update_stage_with_no_new_site_connected_fails_naming_why(
    sites_dir: Path, tmp_path: Path
) -> None:
    # Prepare: the head fitted on hospital A
    plan = validate_plan(incremental_raw())
    registry = Registry(tmp_path / "registry")
    state = tmp_path / "site-state"
    everyone = InProcessTransport([sites_dir / s for s in SITES], state)
    Coordinator(plan, registry, everyone, site_wait=0).run(only_stage="foundation")
    alone = InProcessTransport([sites_dir / SITES[0]], state)
    Coordinator(plan, registry, alone, site_wait=0).run(only_stage="seg-a")
    # Execute / Assert: only A connected for the update: refused, the stage fails clearly
    with pytest.raises(StageError, match="already in the analytic head\\(s\\) \\['lesion-seg'\\]"):
        Coordinator(plan, registry, alone, site_wait=0).run(only_stage="seg-b")
    assert registry.progress(plan.name).completed_stages == ["foundation", "seg-a"]
    capabilities = {"site": "hospital-b", "modalities": ["ct"], "counts": {}}
    newcomer = check_site(plan, 2, 7, capabilities, counted={"hospital-a": ["seg-a"]})
    assert not any("already in" in r for r in newcomer.reasons)


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            [{"name": "u", "update_analytic": ["nothing"], "rounds": 1}],
            "stages[2].update_analytic[0]: 'nothing' is not an analytic head",
        ),
        (
            [{"name": "u", "update_analytic": ["lesion-seg"], "rounds": 2}],
            "stages[2]: an update stage sends statistics once",
        ),
        (
            [{"name": "u", "update_analytic": ["lesion-seg"], "train": ["backbone"]}],
            "stages[2]: an update stage (update_analytic) only adds statistics",
        ),
        (
            [
                {"name": "tune", "objectives": ["lesion-class"], "train": ["backbone"]},
                {"name": "u", "update_analytic": ["lesion-seg"], "rounds": 1},
            ],
            "stages[3].update_analytic[0]: the statistics in 'lesion-seg' were computed on "
            "features that later stages changed ('tune' trains ['backbone'])",
        ),
    ],
    ids=["unknown-head", "rounds", "trains", "encoder-changed"],
)
def test_plan_check_refuses_update_stages_that_cannot_add_up(
    stages: list[dict[str, Any]], expected: str
) -> None:
    raw = incremental_raw()
    raw["stages"] = raw["stages"][:2] + stages
    with pytest.raises(PlanError) as caught:
        validate_plan(raw)
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
