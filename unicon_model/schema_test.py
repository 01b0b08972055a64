"""Tests of the plan/stage schema: derived fields, every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from unicon_model.errors import PlanError
from unicon_model.schema import StageSpec, TaskSpec, load_plan, plan_to_dict, validate_plan

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plans" / "unicon.toml"


def minimal(**stage_overrides: object) -> dict[str, object]:
    stage: dict[str, object] = {
        "name": "s1",
        "add_modalities": [{"name": "ct"}],
        "add_tasks": [{"name": "cls", "kind": "classification", "classes": ["a", "b"]}],
    }
    stage.update(stage_overrides)
    return {"name": "p", "stages": [stage]}


def test_example_plan_loads_with_derived_defaults() -> None:
    plan = load_plan(EXAMPLE)
    assert plan.stage_names == ["foundation", "prognosis", "segmentation", "pet"]
    prognosis = plan.stage("prognosis")
    assert prognosis.trained_components == ("task/survival",)
    assert prognosis.objective_tasks == ("survival",)
    assert plan.stage_modalities(1) == ("ct",)
    assert plan.stage_modalities(3) == ("pet",)
    assert plan.stages[3].trained_components == ("modality/pet",)
    assert plan.stages[1].secure_aggregation is True
    assert set(plan.tasks_until(2)) == {"lesion-class", "survival", "lesion-seg"}
    # round trip through plain data
    assert validate_plan(plan_to_dict(plan)) == plan


def test_specs_are_frozen() -> None:
    plan = validate_plan(minimal())
    with pytest.raises(pydantic.ValidationError):
        plan.stages[0].rounds = 5  # type: ignore[misc]


def test_field_errors_of_every_stage_are_reported_together() -> None:
    # Prepare: problems in the header and in three different stages
    data = minimal(rounds=0)
    data["model"] = {"spatial_dims": 4}
    data["stages"].append(  # type: ignore[attr-defined]
        {"name": "s2", "add_tasks": [{"name": "seg", "kind": "segmentation"}]}
    )
    data["stages"].append(  # type: ignore[attr-defined]
        {"name": "s3", "optimiser": {"lr": 1}, "privacy": {"mode": "local", "delta": 2}}
    )
    # Execute
    with pytest.raises(PlanError) as caught:
        validate_plan(data, source="plan.toml")
    # Assert: one error, every problem, each naming its field
    problems = caught.value.problems
    text = str(caught.value)
    assert "plan.toml" in text
    assert any(p.startswith("stages[0].rounds:") for p in problems)
    assert any(p.startswith("stages[1].add_tasks[0]") and "labels" in p for p in problems)
    assert any(p.startswith("stages[2].optimiser:") and "unknown field" in p for p in problems)
    assert any(p.startswith("stages[2].privacy.delta:") for p in problems)
    assert any(p.startswith("model.spatial_dims:") for p in problems)
    assert len(problems) == 5


def test_cross_stage_errors_are_reported_together() -> None:
    data = {
        "name": "p",
        "model": {"spatial_dims": 3},
        "data": {"patch_size": [32, 32]},
        "stages": [
            {
                "name": "s1",
                "add_modalities": [{"name": "ct"}],
                "add_tasks": [{"name": "cls", "kind": "classification", "classes": ["a", "b"]}],
                "train": ["backbone", "task/unknown"],
            },
            {
                "name": "s1",
                "add_modalities": [{"name": "pet", "init_from": "mr"}, {"name": "ct"}],
                "objectives": ["seg"],
                "secure_aggregation": True,
                "privacy": {"mode": "central"},
            },
            {
                "name": "s3",
                "add_tasks": [
                    {
                        "name": "ridge",
                        "kind": "classification",
                        "classes": ["a", "b"],
                        "head": "analytic",
                    }
                ],
                "rounds": 3,
            },
        ],
    }
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    problems = caught.value.problems
    expected = [
        "data.patch_size: has 2 values",
        "stages[0].train[1]: unknown component 'task/unknown'",
        "stages[1].name: stage name 's1' is used twice",
        "stages[1].add_modalities[0].init_from: 'mr' is not a modality",
        "stages[1].add_modalities[1]: modality 'ct' already exists",
        "stages[1].objectives[0]: unknown task 'seg'",
        "stages[1]: central DP needs the server",
        "stages[1].min_sites: secure aggregation",
        "stages[2]: an analytic stage sends statistics once",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == len(expected)


def test_task_spec_kind_rules() -> None:
    with pytest.raises(pydantic.ValidationError, match="only supported for classification"):
        TaskSpec(name="s", kind="survival", head="analytic")
    assert TaskSpec(name="s", kind="survival").num_outputs == 1
    assert TaskSpec(name="g", kind="segmentation", labels=("bg", "a", "b")).num_outputs == 3


def test_stage_spec_rejects_bad_secagg_threshold() -> None:
    with pytest.raises(pydantic.ValidationError, match="reconstruction_threshold"):
        StageSpec(name="s", secagg={"num_shares": 2, "reconstruction_threshold": 3})


def test_load_plan_names_the_file_for_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"missing\.toml"):
        load_plan(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(PlanError, match=r"broken\.toml[\s\S]*not valid toml"):
        load_plan(broken)
