"""Plan checks of label extensions (``extends``): what they extend and the labels they add.

A label extension (:attr:`unicon_model.schema.TaskSpec.extends`) adds labels to a segmentation
task learned earlier. Each must name a segmentation task added before it (by an earlier stage,
or earlier in its own stage) that is not itself an extension, and the labels it adds must be
new: not a label of that task nor of another extension of it, so the merged label map
(:mod:`unicon_model.label_extensions`) names every label once.
"""

from __future__ import annotations

from collections.abc import Sequence

from unicon_model.schema.lenient import _shown
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.tasks import TaskSpec


def _extension_problems(stages: Sequence[tuple[StageSpec | None, frozenset[str]]]) -> list[str]:
    """Every problem of the plan's label extensions, with its field path.

    ``stages`` pairs each stage's lenient parse (``None`` if unreadable) with its replaced
    fields; the check stops at an unreadable stage (names it defines are unknown).
    """
    problems: list[str] = []
    tasks: dict[str, TaskSpec] = {}
    labels: dict[str, list[str]] = {}  # base task -> every label, its extensions' included
    for i, (stage, _) in enumerate(stages):
        if stage is None:
            return problems
        for j, task in enumerate(stage.add_tasks):
            at = f"stages[{i}].add_tasks[{j}].extends"
            if task.extends is not None:
                problems += _one_extension_problems(at, task, tasks, labels)
            elif task.kind == "segmentation":
                labels.setdefault(task.name, list(task.labels))
            tasks.setdefault(task.name, task)
    return problems


def _one_extension_problems(
    at: str, task: TaskSpec, tasks: dict[str, TaskSpec], labels: dict[str, list[str]]
) -> list[str]:
    """The problems of one extension; records its labels under its base when it has none."""
    assert task.extends is not None
    base = tasks.get(task.extends)
    if base is None:
        return [
            f"{at}: {task.extends!r} is not a task added before {task.name!r} (known so far: "
            f"{_shown(tasks)}); a label extension extends an earlier segmentation task"
        ]
    if base.kind != "segmentation":
        kind = base.kind
        return [f"{at}: {task.extends!r} is a {kind} task; only segmentation tasks take labels"]
    if base.extends is not None:
        return [
            f"{at}: {task.extends!r} is itself an extension of {base.extends!r}; extend "
            f"{base.extends!r} instead (its extensions' labels merge in stage order)"
        ]
    known = labels[base.name]
    repeated = [label for label in task.labels[1:] if label in known]
    if repeated:
        return [
            f"{at}: {task.name!r} adds {repeated}, which {task.extends!r} already has "
            f"(its labels: {known}); add only new labels"
        ]
    known.extend(task.labels[1:])
    return []
