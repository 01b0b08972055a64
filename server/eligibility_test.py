"""Capabilities are untrusted: every problem is reported, counts bound the replies."""

from __future__ import annotations

import math
from typing import Any

from server.eligibility import (
    capability_problems,
    check_site,
    duplicate_reasons,
    train_bound,
)
from tests.conftest import tiny_plan
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
