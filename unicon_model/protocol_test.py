"""Request parsing: every name that becomes a path is checked, all problems reported at once."""

from __future__ import annotations

import json
from typing import Any

import pytest

from unicon_model.protocol import ProtocolError, StageRequest
from unicon_model.schema import validate_plan

PLAN: dict[str, Any] = {
    "name": "tiny",
    "stages": [
        {
            "name": "foundation",
            "add_modalities": [{"name": "ct"}],
            "add_tasks": [{"name": "lesion", "kind": "classification", "classes": ["a", "b"]}],
            "train": ["backbone", "modality/ct", "task/lesion"],
        }
    ],
}
DIGEST = "a" * 64


def config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "plan": json.dumps(PLAN),
        "stage": "foundation",
        "server-round": 1,
        "run": "tiny-0123456789ab",
        "digests": json.dumps({"backbone": DIGEST, "task/lesion": DIGEST}),
        "split": "test",
    }
    return {**base, **overrides}


def test_a_valid_config_round_trips() -> None:
    request = StageRequest.from_config(config())
    assert request.run == "tiny-0123456789ab" and request.server_round == 1
    assert request.split == "test" and request.digests["backbone"] == DIGEST
    assert StageRequest.from_config(request.to_config()) == request
    assert StageRequest.from_config(config(**{"server-round": "3"})).server_round == 3
    assert validate_plan(PLAN).name == "tiny"


@pytest.mark.parametrize(
    "run", ["../../x", "/etc/passwd", "a\n", "run\u200b", "r\u202eun", "", "A", "x" * 65, 5]
)
def test_a_run_that_breaks_the_name_rule_is_a_protocol_error(run: object) -> None:
    with pytest.raises(ProtocolError, match=r"config field 'run'.*not a valid name"):
        StageRequest.from_config(config(run=run))


def test_every_problem_is_reported_at_once() -> None:
    bad = config(
        run="../x",
        stage="../../etc",
        split="train\n",
        digests=json.dumps({"../backbone": DIGEST, "backbone": "../" + "a" * 61}),
        **{"server-round": "-1"},
    )
    with pytest.raises(ProtocolError) as e:
        StageRequest.from_config(bad)
    message = str(e.value)
    assert "6 problem(s)" in message
    for part in (
        "config field 'run'",
        "config field 'stage'",
        "config field 'server-round' must be an integer >= 0, got '-1'",
        "config field 'split' must be one of ('train', 'val', 'test')",
        "component '../backbone'",
        "config field 'digests'['backbone']",
    ):
        assert part in message


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "1.0", "x", None, "9" * 40])
def test_a_bad_server_round_is_a_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError, match="'server-round' must be an integer >= 1 for a train"):
        StageRequest.from_config(config(split="train", **{"server-round": value}))


def test_evaluation_requests_carry_round_zero() -> None:
    request = StageRequest.from_config(config(split="test", **{"server-round": 0}))
    assert request.server_round == 0 and request.split == "test"
    with pytest.raises(ProtocolError, match=r"integer >= 0, got -1"):
        StageRequest.from_config(config(split="val", **{"server-round": -1}))


def test_an_unknown_stage_is_named() -> None:
    with pytest.raises(ProtocolError, match="stage 'other' is not in plan 'tiny'"):
        StageRequest.from_config(config(stage="other"))


@pytest.mark.parametrize("field", ["plan", "digests"])
def test_json_nested_50k_deep_is_a_protocol_error(field: str) -> None:
    deep = "[" * 50_000 + "]" * 50_000
    with pytest.raises(ProtocolError, match=f"'{field}' is nested too deeply"):
        StageRequest.from_config(config(**{field: deep}))


def test_missing_fields_and_non_json_are_named() -> None:
    with pytest.raises(ProtocolError, match="'run' is missing"):
        StageRequest.from_config({k: v for k, v in config().items() if k != "run"})
    with pytest.raises(ProtocolError, match="'digests' is not valid JSON"):
        StageRequest.from_config(config(digests="{"))
    with pytest.raises(ProtocolError, match="'digests' must be a JSON object"):
        StageRequest.from_config(config(digests="[]"))
