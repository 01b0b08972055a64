"""Plan checks of label extensions: what they extend, the labels they add, their dump."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from unicon_model.errors import PlanError
from unicon_model.schema import TaskSpec, plan_to_dict, validate_plan

ORGANS = {
    "name": "organ-seg",
    "kind": "segmentation",
    "labels": ["background", "liver", "lungs"],
}
GRADE = {"name": "grade", "kind": "classification", "classes": ["low", "high"]}


def extension(name: str, extends: str, *labels: str) -> dict[str, Any]:
    """A segmentation task adding ``labels`` to ``extends``."""
    return {
        "name": name,
        "kind": "segmentation",
        "extends": extends,
        "labels": ["background", *labels],
    }


def plan(*later: list[dict[str, Any]]) -> dict[str, Any]:
    """A first stage adding CT, ``organ-seg`` and ``grade``; then a stage per ``later``."""
    stages: list[dict[str, Any]] = [
        {"name": "organs", "add_modalities": [{"name": "ct"}], "add_tasks": [ORGANS, GRADE]}
    ]
    stages += [{"name": f"s{i + 1}", "add_tasks": tasks} for i, tasks in enumerate(later)]
    return {"name": "p", "stages": stages}


def problems_of(data: dict[str, Any]) -> list[str]:
    """The problems of the PlanError that ``data`` raises."""
    with pytest.raises(PlanError) as caught:
        validate_plan(data)
    return list(caught.value.problems)


def test_extensions_of_one_task_in_and_after_its_stage_are_valid() -> None:
    # Prepare: an extension in the base's own stage (after it), two more later
    data = plan([extension("organ-spine", "organ-seg", "spine")])
    data["stages"][0]["add_tasks"].append(extension("organ-heart", "organ-seg", "heart"))
    data["stages"][1]["add_tasks"].append(
        extension("organ-kidney", "organ-seg", "kidney-l", "kidney-r")
    )
    # Execute
    valid = validate_plan(data)
    # Assert
    tasks = valid.tasks_until(1)
    assert [tasks[t].extends for t in ("organ-heart", "organ-spine", "organ-kidney")] == [
        "organ-seg"
    ] * 3
    assert tasks["organ-spine"].label_source == "organ-seg"
    assert tasks["organ-seg"].label_source == "organ-seg"


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        (
            [[extension("organ-spine", "kidney-seg", "spine")]],
            "stages[1].add_tasks[0].extends: 'kidney-seg' is not a task added before "
            "'organ-spine' (known so far: ['grade', 'organ-seg'])",
        ),
        (  # the task is added later in the same stage: not known yet
            [[extension("organ-spine", "late-seg", "spine"), {**ORGANS, "name": "late-seg"}]],
            "stages[1].add_tasks[0].extends: 'late-seg' is not a task added before 'organ-spine'",
        ),
        (
            [[extension("grade-spine", "grade", "spine")]],
            "stages[1].add_tasks[0].extends: 'grade' is a classification task; only "
            "segmentation tasks take labels",
        ),
        (
            [
                [extension("organ-spine", "organ-seg", "spine")],
                [extension("organ-ribs", "organ-spine", "ribs")],
            ],
            "stages[2].add_tasks[0].extends: 'organ-spine' is itself an extension of "
            "'organ-seg'; extend 'organ-seg' instead",
        ),
        (
            [[extension("organ-more", "organ-seg", "liver", "spine", "lungs")]],
            "stages[1].add_tasks[0].extends: 'organ-more' adds ['liver', 'lungs'], which "
            "'organ-seg' already has (its labels: ['background', 'liver', 'lungs'])",
        ),
        (  # a label an earlier extension of the same task added
            [
                [extension("organ-spine", "organ-seg", "spine")],
                [
                    extension("organ-heart", "organ-seg", "heart"),
                    extension("organ-bones", "organ-seg", "ribs", "spine"),
                ],
            ],
            "stages[2].add_tasks[1].extends: 'organ-bones' adds ['spine'], which "
            "'organ-seg' already has (its labels: ['background', 'liver', 'lungs', 'spine', "
            "'heart'])",
        ),
    ],
    ids=["unknown", "added-later", "classification", "extension", "repeated", "repeated-later"],
)
def test_a_bad_extension_is_refused_with_its_field_path(
    stages: list[list[dict[str, Any]]], expected: str
) -> None:
    # Execute
    problems = problems_of(plan(*stages))
    # Assert: exactly this problem
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_every_extension_problem_of_a_plan_comes_in_one_error() -> None:
    # Prepare: an unknown base in stage 1, a classification base and a repeated label in
    # stage 2 (the valid extension between them must not be reported)
    data = plan(
        [extension("organ-spine", "nothing", "spine")],
        [
            extension("grade-spine", "grade", "spine"),
            extension("organ-heart", "organ-seg", "heart"),
            extension("organ-lungs", "organ-seg", "lungs"),
        ],
    )
    # Execute
    problems = problems_of(data)
    # Assert: every problem, in plan order
    assert [p.split(":")[0] for p in problems] == [
        "stages[1].add_tasks[0].extends",
        "stages[2].add_tasks[0].extends",
        "stages[2].add_tasks[2].extends",
    ]
    assert "'nothing' is not a task added before" in problems[0]
    assert "'grade' is a classification task" in problems[1]
    assert "adds ['lungs'], which 'organ-seg' already has" in problems[2]


# ---------------------------------------------------------------- TaskSpec


def test_extends_on_a_task_that_is_not_segmentation_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="a classification task cannot extend"):
        TaskSpec(name="c", kind="classification", classes=("a", "b"), extends="organ-seg")
    with pytest.raises(pydantic.ValidationError, match="a survival task cannot extend"):
        TaskSpec(name="s", kind="survival", extends="organ-seg")


def test_labels_named_twice_and_a_new_label_named_like_the_background_are_refused() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"`labels` names \['spine'\] more than once"
    ):
        TaskSpec(name="s", kind="segmentation", labels=("background", "spine", "spine"))
    own = {**extension("organ-bg", "organ-seg", "x"), "labels": ["none", "background"]}
    raw = plan([own])
    with pytest.raises(PlanError, match=r"'organ-bg' adds \['background'\], which 'organ-seg'"):
        validate_plan(raw)


def test_extends_naming_the_task_itself_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="'organ-seg': `extends` names the task"):
        TaskSpec(name="organ-seg", kind="segmentation", labels=("bg", "x"), extends="organ-seg")


def test_extends_is_left_out_of_a_dumped_plan_without_it_and_round_trips_with_it() -> None:
    # Prepare
    plain = validate_plan(plan())
    spelled = plan()
    spelled["stages"][0]["add_tasks"] = [{**ORGANS, "extends": None}, GRADE]
    extended = validate_plan(plan([extension("organ-spine", "organ-seg", "spine")]))
    # Execute
    dumped = plan_to_dict(plain)
    dumped_extended = plan_to_dict(extended)
    # Assert: no key without it, so the bytes (and the digest) stay as they were
    assert all("extends" not in t for t in dumped["stages"][0]["add_tasks"])
    assert '"extends"' not in plain.model_dump_json()
    assert validate_plan(spelled).model_dump_json() == plain.model_dump_json()
    # Assert: with it, the dump names it and loads back to the same plan
    assert dumped_extended["stages"][1]["add_tasks"][0]["extends"] == "organ-seg"
    assert "extends" not in dumped_extended["stages"][0]["add_tasks"][0]
    assert validate_plan(dumped_extended) == extended
