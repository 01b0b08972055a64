"""Each kind of stage gets its round strategy: the flags the coordinator used to test."""

from __future__ import annotations

from typing import Any

import pytest

from server.rounds import (
    STRATEGIES,
    AnalyticRound,
    FedAvgRound,
    RoundStrategy,
    SecureAggregationRound,
    select_strategy,
)
from unicon_model.schema import StageSpec

CLASSIFY = {"name": "lesion", "kind": "classification", "classes": ["benign", "malignant"]}
RIDGE = {**CLASSIFY, "name": "ridge", "head": "analytic"}


def stage(**fields: Any) -> StageSpec:
    return StageSpec.model_validate({"name": "stage", **fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"add_modalities": [{"name": "ct"}]}, FedAvgRound),
        ({"add_tasks": [CLASSIFY]}, FedAvgRound),
        ({"add_tasks": [RIDGE, CLASSIFY]}, FedAvgRound),  # not every head analytic: trained
        ({"add_tasks": [RIDGE]}, AnalyticRound),
        ({"add_tasks": [CLASSIFY], "secure_aggregation": True}, SecureAggregationRound),
        ({"add_tasks": [RIDGE], "secure_aggregation": True}, SecureAggregationRound),
    ],
)
def test_a_stage_gets_the_strategy_of_its_kind(
    fields: dict[str, Any], expected: type[RoundStrategy]
) -> None:
    chosen = select_strategy(stage(**fields))
    assert type(chosen) is expected
    # exactly one built-in strategy claims the stage: the order of STRATEGIES is not hiding one
    assert [s for s in STRATEGIES if s.handles(stage(**fields))] == [expected]


def test_every_stage_run_gets_a_fresh_strategy_instance() -> None:
    spec = stage(add_tasks=[CLASSIFY])
    assert select_strategy(spec) is not select_strategy(spec)
    assert [s.name for s in STRATEGIES] == ["secure", "analytic", "fedavg"]
