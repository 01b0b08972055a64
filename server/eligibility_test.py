"""Capabilities are untrusted: every problem is reported, counts bound the replies."""

from __future__ import annotations

import math
from typing import Any

import pytest

from server.eligibility import (
    capability_problems,
    check_site,
    duplicate_reasons,
    train_bound,
)
from tests.conftest import TINY_MODEL, tiny_plan
from unicon_model.schema import validate_plan


def caps(**changes: Any) -> dict[str, Any]:
    split = {"train": 8, "val": 2, "test": 3}
    value: dict[str, Any] = {
        "site": "site-a",
        "modalities": ["ct", "pet"],
        "counts": {
            "cases": dict(split),
            "tasks": {"lesion-class": dict(split), "lesion-seg": dict(split)},
            "modalities": {"ct": dict(split), "pet": {"train": 5, "val": 0, "test": 0}},
        },
        "policy": {},
        "epsilon": 0.0,
    }
    value.update(changes)
    return value


def test_honest_capabilities_have_no_problem() -> None:
    assert capability_problems(caps()) == []


def test_every_problem_is_reported_at_once() -> None:
    bad = caps(
        site="Site A",
        epsilon=math.inf,
        modalities="ct",
        counts={"cases": {"train": -1}, "tasks": {"x": {"train": 1.5}}},
        policy={"allowed_tasks": "all"},
    )
    text = " | ".join(capability_problems(bad))
    for part in (
        "site name 'Site A' is not a valid name",
        "epsilon must be a finite number >= 0, got inf",
        "modalities must be a list of names",
        "counts.cases.train must be a non-negative whole number, got -1",
        "counts.tasks.x.train must be a non-negative whole number, got 1.5",
        "policy.allowed_tasks must be a list of names",
    ):
        assert part in text


def test_check_site_refuses_malformed_capabilities_without_crashing() -> None:
    plan = validate_plan(tiny_plan())
    result = check_site(plan, 0, 7, {"site": 5, "counts": []})  # type: ignore[dict-item]
    assert not result.eligible and result.site == "node-7"
    assert any("counts must be an object" in r for r in result.reasons)


def test_train_bound_is_the_train_count_of_the_best_route() -> None:
    plan = validate_plan(tiny_plan())
    assert train_bound(plan, 0, caps()) == 8  # ct route: min(cases 8, ct 8)
    # the pet route needs ct and pet images: min(8, 5) = 5 train cases at most
    assert train_bound(plan, 3, caps()) == 5
    assert train_bound(plan, 0, caps(counts={"cases": {"train": 8}})) == 0


def test_duplicate_names_refuse_every_node_reporting_them() -> None:
    reasons = duplicate_reasons({1: "site-a", 2: "site-b", 3: "site-a"})
    assert set(reasons) == {1, 3}
    assert "site name 'site-a' is reported by nodes [1, 3]" in reasons[1]


# ---------------------------------------------------------------- label extensions


def organs_then_spine() -> dict[str, Any]:
    """Organ segmentation on CT, then the spine added to it as a label extension."""
    organs = {
        "name": "organ-seg",
        "kind": "segmentation",
        "labels": ["background", "liver", "lungs"],
    }
    spine = {
        "name": "organ-spine",
        "kind": "segmentation",
        "extends": "organ-seg",
        "labels": ["background", "spine"],
    }
    return {
        "name": "organ-labels",
        "model": TINY_MODEL,
        "data": {"patch_size": [16, 16, 16]},
        "stages": [
            {"name": "organs", "add_modalities": [{"name": "ct"}], "add_tasks": [organs]},
            {"name": "spine", "add_tasks": [spine]},
        ],
    }


def test_an_extension_stage_counts_the_train_cases_of_the_task_it_extends() -> None:
    # Prepare: the site labels organ-seg only (its masks also hold the spine)
    plan = validate_plan(organs_then_spine())
    split = {"train": 6, "val": 1, "test": 1}
    capabilities = caps(counts={"cases": split, "tasks": {"organ-seg": split}})
    # Execute
    result = check_site(plan, 1, 3, capabilities)
    # Assert
    assert plan.stages[1].objective_tasks == ("organ-spine",)
    assert result.eligible and result.reasons == ()


@pytest.mark.parametrize(
    "tasks",
    [
        {},
        {"lesion-seg": {"train": 6}},
        {"organ-spine": {"train": 6}},  # the extension's own name is not what it reads
        {"organ-seg": {"train": 0, "val": 2, "test": 2}},
    ],
    ids=["none", "other-task", "own-name", "no-train-split"],
)
def test_an_extension_stage_refuses_a_site_without_cases_of_the_task_it_extends(
    tasks: dict[str, Any],
) -> None:
    # Prepare
    plan = validate_plan(organs_then_spine())
    capabilities = caps(counts={"cases": {"train": 6, "val": 2, "test": 2}, "tasks": tasks})
    # Execute
    result = check_site(plan, 1, 3, capabilities)
    # Assert: one reason, naming the extension and the task whose masks it reads
    assert not result.eligible
    assert result.reasons == (
        "no training cases labelled for task 'organ-spine' (it extends 'organ-seg' and reads "
        "its masks)",
    )
