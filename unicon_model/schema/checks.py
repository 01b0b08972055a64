"""Cross-field checks of a plan: ``model`` against ``data``, and the checks that span stages
(names defined before use, no duplicates, valid growth, regularisers with weights to protect).

Every check runs on the lenient parse of :mod:`unicon_model.schema.lenient` and skips what
reads a field that was replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from unicon_model.schema.base import BACKBONE, modality_component, task_component
from unicon_model.schema.data import DataSpec
from unicon_model.schema.lenient import _shown, _valid
from unicon_model.schema.modalities import ModalitySpec
from unicon_model.schema.model import ModelSpec
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.tasks import TaskSpec


def _header_problems(
    model: ModelSpec | None,
    model_bad: frozenset[str],
    data: DataSpec | None,
    data_bad: frozenset[str],
) -> list[str]:
    """Checks between ``model`` and ``data`` that read only fields that are valid."""
    problems: list[str] = []
    if model is None or data is None:
        return problems
    dims = model.spatial_dims
    dims_ok = _valid(model_bad, "spatial_dims")
    patch_ok = _valid(data_bad, "patch_size")
    if dims_ok and patch_ok and len(data.patch_size) != dims:
        problems.append(
            f"data.patch_size: has {len(data.patch_size)} values but model.spatial_dims "
            f"is {dims}; give one size per spatial dimension"
        )
    spacing = data.spacing
    if dims_ok and _valid(data_bad, "spacing") and spacing is not None and len(spacing) != dims:
        problems.append(f"data.spacing: give {dims} values (one per spatial dimension)")
    halvings = len(model.widths) - 1
    if _valid(model_bad, "widths") and patch_ok and any(p % 2**halvings for p in data.patch_size):
        problems.append(
            f"data.patch_size: each size must be divisible by {2**halvings} "
            f"(the encoder halves the resolution {halvings} times)"
        )
    return problems


def _forgetting_problems(
    at: str,
    stage: StageSpec,
    earlier: Mapping[str, TaskSpec],
    modalities: Mapping[str, ModalitySpec],
) -> list[str]:
    """EWC and LwF need the stage to train weights that the earlier tasks use.

    Both protect the earlier tasks (learned before the stage and not among its objectives)
    through the weights the stage trains: EWC needs their gradient (a site would fail with
    "element 0 of tensors does not require grad"), LwF's distillation is constant otherwise.
    On a site's route ``modality`` those weights are the backbone, the earlier tasks' heads
    and ``modality/<modality>``; every modality of the stage must be covered.
    """
    regularised = [(j, r.kind) for j, r in enumerate(stage.regularisers) if r.kind != "fedprox"]
    old = [name for name in earlier if name not in stage.objective_tasks]
    if not regularised or not old:
        return []
    trained = set(stage.trained_components)
    if BACKBONE in trained or any(task_component(t) in trained for t in old):
        return []
    routes = stage.modalities or tuple(m.name for m in stage.add_modalities) or tuple(modalities)
    uncovered = [modality_component(m) for m in routes if modality_component(m) not in trained]
    if not uncovered:
        return []
    return [
        f"{at}.regularisers[{j}]: {kind} protects the earlier tasks {old} through the weights "
        f"they share with this stage, but the stage trains only {sorted(trained)}, which those "
        f"tasks do not use; add 'backbone' (or {uncovered}) to `train`, or remove the "
        "regulariser"
        for j, kind in regularised
    ]


def _cross_stage_problems(
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """Checks that span stages: names defined before use, no duplicates, valid growth.

    ``stages`` pairs each stage (a stand-in for an invalid one, ``None`` if there is none)
    with its replaced fields; a check that reads a replaced field is skipped, and the checks
    of names defined earlier stop at a stage without a stand-in.
    """
    problems: list[str] = []
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, TaskSpec] = {}
    stage_names: set[str] = set()
    lost = False  # an earlier stage could not be read: names it defines are unknown
    for i, (stage, bad) in enumerate(stages):
        at = f"stages[{i}]"
        if stage is None:
            lost = True
            continue
        if stage.name in stage_names:
            problems.append(f"{at}.name: stage name {stage.name!r} is used twice")
        stage_names.add(stage.name)
        problems += _added_problems(at, stage, modalities, tasks, lost)
        earlier = dict(tasks)
        modalities.update({m.name: m for m in stage.add_modalities})
        tasks.update({t.name: t for t in stage.add_tasks})
        problems += _reference_problems(at, stage, bad, modalities, tasks, lost)
        problems += _stage_setting_problems(at, stage, bad)
        reads = ("regularisers", "train", "add_modalities", "add_tasks", "objectives", "modalities")
        if not lost and _valid(bad, *reads):
            problems.extend(_forgetting_problems(at, stage, earlier, modalities))
    return problems


def _added_problems(
    at: str,
    stage: StageSpec,
    modalities: Mapping[str, ModalitySpec],
    tasks: Mapping[str, TaskSpec],
    lost: bool,
) -> list[str]:
    """Modalities and tasks the stage adds again, and ``init_from`` naming no earlier modality.

    ``modalities`` and ``tasks`` are those added by the earlier stages; ``lost`` says an
    earlier stage could not be read (then an unknown ``init_from`` is not reported).
    """
    problems: list[str] = []
    for j, mod in enumerate(stage.add_modalities):
        if mod.name in modalities:
            problems.append(
                f"{at}.add_modalities[{j}]: modality {mod.name!r} already exists; "
                "train its component instead of adding it again"
            )
        if mod.init_from is not None and mod.init_from not in modalities and not lost:
            problems.append(
                f"{at}.add_modalities[{j}].init_from: {mod.init_from!r} is not a modality "
                f"added by an earlier stage (known: {_shown(modalities)})"
            )
    for j, task in enumerate(stage.add_tasks):
        if task.name in tasks:
            problems.append(f"{at}.add_tasks[{j}]: task {task.name!r} already exists")
    return problems


def _reference_problems(
    at: str,
    stage: StageSpec,
    bad: frozenset[str],
    modalities: Mapping[str, ModalitySpec],
    tasks: Mapping[str, TaskSpec],
    lost: bool,
) -> list[str]:
    """Components, objectives and modalities the stage names that do not exist (yet).

    ``modalities`` and ``tasks`` include those the stage adds; ``bad`` are the stage's
    replaced fields, ``lost`` says an earlier stage could not be read (then an unknown name
    may be one it defines and is not reported).
    """
    problems: list[str] = []
    known = {BACKBONE} | {modality_component(m) for m in modalities}
    known |= {task_component(t) for t in tasks}
    for j, component in enumerate(stage.train if _valid(bad, "train") else ()):
        if component not in known:
            if not lost:
                problems.append(
                    f"{at}.train[{j}]: unknown component {component!r}; known so far: "
                    f"{_shown(known)}"
                )
        elif component.startswith("task/") and tasks[component[5:]].head == "analytic":
            problems.append(
                f"{at}.train[{j}]: {component!r} is an analytic head; it is fitted in "
                "closed form by the stage that adds it, not trained by gradient"
            )
    for j, task_name in enumerate(stage.objectives if _valid(bad, "objectives") else ()):
        if task_name not in tasks and not lost:
            problems.append(f"{at}.objectives[{j}]: unknown task {task_name!r}")
    for j, mod_name in enumerate(stage.modalities if _valid(bad, "modalities") else ()):
        if mod_name not in modalities and not lost:
            problems.append(f"{at}.modalities[{j}]: unknown modality {mod_name!r}")
    if not modalities and not lost and _valid(bad, "add_modalities"):
        problems.append(f"{at}: no modality exists yet; add one with add_modalities")
    return problems


def _stage_setting_problems(at: str, stage: StageSpec, bad: frozenset[str]) -> list[str]:
    """Settings of one stage that do not fit together: no objective, analytic heads mixed
    with neural ones or trained for more than one round, central DP or too few sites with
    secure aggregation."""
    problems: list[str] = []
    if not stage.objective_tasks and _valid(bad, "objectives", "add_tasks"):
        problems.append(f"{at}: the stage has no objective; add a task or set objectives")
    analytic = [t.name for t in stage.add_tasks if t.head == "analytic"]
    if analytic and len(analytic) != len(stage.add_tasks) and _valid(bad, "add_tasks"):
        problems.append(
            f"{at}.add_tasks: analytic heads {analytic} must be added in a stage of their own"
        )
    if (
        analytic
        and (stage.train or stage.rounds != 1 or stage.privacy.mode == "local")
        and _valid(bad, "add_tasks", "train", "rounds", "privacy")
    ):
        problems.append(
            f"{at}: an analytic stage sends statistics once: set rounds = 1, leave `train` "
            "empty and use privacy mode 'none' or 'central'"
        )
    if (
        stage.secure_aggregation
        and stage.privacy.mode == "central"
        and _valid(bad, "secure_aggregation", "privacy")
    ):
        problems.append(
            f"{at}: central DP needs the server to clip individual updates, which secure "
            "aggregation hides; use privacy mode 'local' with secure aggregation"
        )
    if (
        stage.secure_aggregation
        and stage.min_sites < stage.secagg.num_shares
        and _valid(bad, "secure_aggregation", "min_sites", "secagg")
    ):
        problems.append(
            f"{at}.min_sites: secure aggregation with num_shares = {stage.secagg.num_shares}"
            f" needs min_sites >= {stage.secagg.num_shares}"
        )
    return problems
