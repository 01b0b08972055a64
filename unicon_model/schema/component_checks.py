"""Checks of the components a plan adds that the encoder and the data must honour: LoRA
ranks and levels, self-supervised reconstruction tasks, and decoder deltas.

Like :mod:`unicon_model.schema.checks`, they run on the lenient parse and skip what reads a
replaced field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from unicon_model.schema.base import BACKBONE
from unicon_model.schema.data import DataSpec
from unicon_model.schema.lenient import _shown, _valid
from unicon_model.schema.modalities import ModalitySpec
from unicon_model.schema.model import ModelSpec
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.tasks import TaskSpec


def _lora_problems(
    model: ModelSpec | None,
    model_bad: frozenset[str],
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """LoRA settings of every added modality and task that the encoder cannot honour.

    Ranks larger than an adapted level's channels, levels the encoder does not have,
    ``lora_levels`` without a rank, and deltas on analytic heads (which have no gradient).
    """
    problems: list[str] = []
    widths_ok = model is not None and _valid(model_bad, "widths")
    widths = model.widths if model is not None else ()
    for i, (stage, _) in enumerate(stages):
        if stage is None:
            continue
        specs: list[tuple[str, ModalitySpec | TaskSpec]] = [
            (f"stages[{i}].add_modalities[{j}]", m) for j, m in enumerate(stage.add_modalities)
        ]
        specs += [(f"stages[{i}].add_tasks[{j}]", t) for j, t in enumerate(stage.add_tasks)]
        for at, spec in specs:
            problems += _lora_spec_problems(at, spec)
            if widths_ok:
                problems += _lora_width_problems(at, spec, widths)
    return problems


def _lora_spec_problems(at: str, spec: ModalitySpec | TaskSpec) -> list[str]:
    """LoRA settings of one modality or task that are wrong whatever the encoder:
    ``lora_levels`` without a rank, deltas on an analytic head, a level listed twice."""
    problems: list[str] = []
    rank, levels = spec.lora_rank, spec.lora_levels
    if levels and rank == 0:
        problems.append(
            f"{at}.lora_levels: set but lora_rank is 0 (no deltas); give lora_rank >= 1 "
            "or remove lora_levels"
        )
    if isinstance(spec, TaskSpec) and spec.head == "analytic" and rank > 0:
        problems.append(
            f"{at}.lora_rank: an analytic head is fitted in closed form on frozen "
            "features and cannot train encoder deltas; set lora_rank = 0 or use "
            "head = 'neural'"
        )
    duplicates = sorted({v for v in levels if levels.count(v) > 1})
    if duplicates:
        problems.append(f"{at}.lora_levels: levels {duplicates} are listed twice")
    return problems


def _lora_width_problems(
    at: str, spec: ModalitySpec | TaskSpec, widths: tuple[int, ...]
) -> list[str]:
    """LoRA settings of one modality or task that the encoder of ``widths`` cannot honour:
    levels it does not have, a rank above an adapted level's channels."""
    problems: list[str] = []
    rank, levels = spec.lora_rank, spec.lora_levels
    last = len(widths) - 1
    for k, level in enumerate(levels):
        if not 0 <= level <= last:
            problems.append(
                f"{at}.lora_levels[{k}]: encoder level {level} does not exist; the "
                f"encoder has levels 0..{last} (one per model.widths entry)"
            )
    chosen = [v for v in levels if 0 <= v <= last] or list(range(last + 1))
    channels = {v: min(widths[max(v - 1, 0)], widths[v]) for v in sorted(set(chosen))}
    too_small = {v: c for v, c in channels.items() if rank > c}
    if rank > 0 and too_small:
        shown = ", ".join(f"level {v} ({c} channels)" for v, c in too_small.items())
        problems.append(
            f"{at}.lora_rank: rank {rank} exceeds the channels of {shown}; a delta's "
            f"rank is at most min(in, out) channels of the level's convolutions: use "
            f"lora_rank <= {min(channels.values())} or adapt other lora_levels"
        )
    return problems


def _self_supervised_problems(
    data: DataSpec | None,
    data_bad: frozenset[str],
    stages: Sequence[tuple[StageSpec | None, frozenset[str]]],
) -> list[str]:
    """Reconstruction tasks that cannot run: blocks that do not tile the patch, more
    ``channels`` than a training route has inputs, or a stage that trains only the decoder."""
    problems: list[str] = []
    patch = data.patch_size if data is not None and _valid(data_bad, "patch_size") else None
    modalities: dict[str, ModalitySpec] = {}
    tasks: dict[str, tuple[str, TaskSpec]] = {}
    for i, (stage, bad) in enumerate(stages):
        if stage is None:
            return problems
        modalities.update({m.name: m for m in stage.add_modalities})
        for j, task in enumerate(stage.add_tasks):
            at = f"stages[{i}].add_tasks[{j}]"
            tasks[task.name] = (at, task)
            if task.kind == "reconstruction" and patch is not None:
                problems += _tiling_problems(at, task, patch)
        if not _valid(bad, "objectives", "add_tasks", "modalities", "add_modalities", "train"):
            continue
        objectives = [tasks[t] for t in stage.objective_tasks if t in tasks]
        reconstruction = [(at, t) for at, t in objectives if t.kind == "reconstruction"]
        if reconstruction:
            problems += _reconstruction_problems(i, stage, reconstruction, modalities, tasks)
    return problems


def _tiling_problems(at: str, task: TaskSpec, patch: tuple[int, ...]) -> list[str]:
    """A reconstruction task whose blocks of ``mask_size`` voxels do not tile ``patch``."""
    uneven = [size for size in patch if size % task.mask_size]
    if not uneven:
        return []
    return [
        f"{at}.mask_size: blocks of {task.mask_size} voxels do not tile the "
        f"patch {list(patch)} (sizes {uneven}); use a divisor of every "
        "data.patch_size entry"
    ]


def _reconstruction_problems(
    i: int,
    stage: StageSpec,
    reconstruction: Sequence[tuple[str, TaskSpec]],
    modalities: Mapping[str, ModalitySpec],
    tasks: Mapping[str, tuple[str, TaskSpec]],
) -> list[str]:
    """Stage ``i``'s reconstruction objectives (each with the field it was added at) that
    ask for more channels than a route has inputs, or that train no encoder weights."""
    problems: list[str] = []
    routes = stage.trained_modalities(modalities)
    for at, task in reconstruction:
        short = [
            f"{m} ({len(modalities[m].input_keys)})"
            for m in routes
            if m in modalities and len(modalities[m].input_keys) < task.channels
        ]
        if short:
            problems.append(
                f"{at}.channels: {task.channels} channel(s) to reconstruct, but the stage's "
                f"route(s) {short} have fewer inputs; lower channels"
            )
    encoder = [
        c
        for c in stage.trained_components
        if c == BACKBONE
        or c.startswith("modality/")
        or (c.startswith("task/") and c[5:] in tasks and tasks[c[5:]][1].lora_rank > 0)
    ]
    if not encoder:
        names = [t.name for _, t in reconstruction]
        problems.append(
            f"stages[{i}].train: the self-supervised task(s) {names} train only their "
            "decoder, so the encoder learns nothing; add 'backbone' (and the modality) "
            "to train"
        )
    return problems


def _decoder_lora_problems(stages: Sequence[tuple[StageSpec | None, frozenset[str]]]) -> list[str]:
    """``decoder_lora`` entries naming a task that is not an earlier neural segmentation
    task."""
    problems: list[str] = []
    tasks: dict[str, TaskSpec] = {}
    for i, (stage, bad) in enumerate(stages):
        if stage is None:
            return problems
        if _valid(bad, "add_modalities"):
            for j, modality in enumerate(stage.add_modalities):
                for task in modality.decoder_lora:
                    at = f"stages[{i}].add_modalities[{j}].decoder_lora.{task}"
                    if task not in tasks:
                        problems.append(
                            f"{at}: no task {task!r} was added by an earlier stage (known: "
                            f"{_shown(tasks)}); decoder deltas adapt an existing decoder"
                        )
                    elif tasks[task].kind != "segmentation":
                        problems.append(
                            f"{at}: task {task!r} is {tasks[task].kind}; decoder deltas exist "
                            "only for segmentation decoders"
                        )
                    elif tasks[task].head == "analytic":
                        problems.append(
                            f"{at}: task {task!r} has an analytic head, fitted in closed form "
                            "with no decoder; decoder deltas adapt a neural segmentation decoder"
                        )
        tasks.update({t.name: t for t in stage.add_tasks})
    return problems
