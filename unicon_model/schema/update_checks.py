"""Plan checks of analytic update stages (``update_analytic``).

An update stage adds new sites' statistics to analytic heads fitted earlier. It must name
analytic heads that exist, do nothing else (add, train), run one round without local DP,
and the features those heads were fitted on must not have changed since: no stage between
the heads' last fit and the update may train the backbone or a modality adapter that existed
then (the stored statistics would describe other features, and the sum would no longer equal
one solve on all the data).
"""

from __future__ import annotations

from collections.abc import Sequence

from unicon_model.schema.base import BACKBONE, modality_component
from unicon_model.schema.lenient import _valid
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.tasks import TaskSpec


def _update_problems(stages: Sequence[tuple[StageSpec | None, frozenset[str]]]) -> list[str]:
    """Every problem of the plan's analytic update stages, with its field path.

    ``stages`` pairs each stage's lenient parse (``None`` if unreadable) with its replaced
    fields; the check stops at an unreadable stage.
    """
    problems: list[str] = []
    tasks: dict[str, TaskSpec] = {}
    fitted_at: dict[str, int] = {}  # analytic task -> index of the stage that last fitted it
    modalities_at: list[set[str]] = []  # stage index -> modalities existing after it
    for i, (stage, bad) in enumerate(stages):
        if stage is None:
            return problems
        known = set(modalities_at[-1]) if modalities_at else set()
        modalities_at.append(known | {m.name for m in stage.add_modalities})
        if stage.update_analytic and _valid(bad, "update_analytic"):
            problems += _stage_problems(i, stage, bad, tasks)
            for j, name in enumerate(stage.update_analytic):
                if name in fitted_at:
                    problems += _changed_features(
                        i, j, name, fitted_at[name], stages, modalities_at
                    )
                    fitted_at[name] = i
        for task in stage.add_tasks:
            tasks.setdefault(task.name, task)
            if task.head == "analytic":
                fitted_at[task.name] = i
    return problems


def _stage_problems(
    i: int, stage: StageSpec, bad: frozenset[str], tasks: dict[str, TaskSpec]
) -> list[str]:
    """An update stage that does something else, or names no earlier analytic head."""
    at = f"stages[{i}]"
    analytic = sorted(n for n, t in tasks.items() if t.head == "analytic")
    problems = [
        f"{at}.update_analytic[{j}]: {name!r} is not an analytic head added by an earlier "
        f"stage (analytic heads so far: {analytic})"
        for j, name in enumerate(stage.update_analytic)
        if name not in tasks or tasks[name].head != "analytic"
    ]
    if stage.add_tasks or stage.add_modalities or stage.train:
        problems.append(
            f"{at}: an update stage (update_analytic) only adds statistics to earlier heads; "
            "move add_tasks, add_modalities and train to a stage of their own"
        )
    if _valid(bad, "rounds", "privacy") and (stage.rounds != 1 or stage.privacy.mode == "local"):
        problems.append(
            f"{at}: an update stage sends statistics once: set rounds = 1 and use privacy "
            "mode 'none' or 'central'"
        )
    if stage.objectives and set(stage.objectives) != set(stage.update_analytic):
        problems.append(
            f"{at}.objectives: an update stage's objectives are its update_analytic heads; "
            "remove objectives"
        )
    return problems


def _changed_features(
    i: int,
    j: int,
    name: str,
    fitted: int,
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
    modalities_at: Sequence[set[str]],
) -> list[str]:
    """The stages between the head's last fit and the update that change its features."""
    frozen = {BACKBONE} | {modality_component(m) for m in modalities_at[fitted]}
    changing = [
        f"{stage.name!r} trains {sorted(frozen & set(stage.trained_components))}"
        for stage, _ in stages[fitted + 1 : i]
        if stage is not None and frozen & set(stage.trained_components)
    ]
    if not changing:
        return []
    return [
        f"stages[{i}].update_analytic[{j}]: the statistics in {name!r} were computed on "
        f"features that later stages changed ({'; '.join(changing)}); adding new statistics "
        "to them would mix two encoders. Fit a new analytic task instead, or update before "
        "those stages"
    ]
