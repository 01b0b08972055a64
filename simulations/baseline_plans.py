"""Plan transforms of the baselines of ``unicon simulate --compare``.

See :mod:`simulations.baselines` for the methods.

Each takes the UNICON plan as a dictionary and returns the plan a baseline runs: every
stage training the shared backbone (``naive``, ``ewc``, ``lwf``), added modalities on
their source's inputs only (``no-pet``), one site without secure aggregation
(``centralised``, ``local``), each later stage alone from scratch (``single-task``), and
UNICON's own variant with its segmentation heads fitted analytically (``analytic-seg``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from unicon_model.schema import validate_plan

logger = logging.getLogger(__name__)

ABLATION_SUFFIX = "-ablation"


class BaselineError(ValueError):
    """A baseline cannot run on this plan or these sites (the message says why)."""


def shared_backbone_plan(
    raw: Mapping[str, Any], *, regulariser: dict[str, Any] | None
) -> dict[str, Any]:
    """The plan with every stage training the backbone (no parameter isolation).

    Parameters
    ----------
    raw
        The plan as a dictionary (validated).
    regulariser
        Added to every stage after the first (``None``: no regulariser at all).
    """
    plan = validate_plan(raw)
    out = copy.deepcopy(dict(raw))
    for index, (stage, spec) in enumerate(zip(out["stages"], plan.stages, strict=True)):
        if spec.is_analytic:
            continue
        modalities = [f"modality/{m}" for m in plan.stage_modalities(index)]
        heads = [f"task/{t}" for t in spec.objective_tasks]
        stage["train"] = ["backbone", *modalities, *heads]
        stage["regularisers"] = [regulariser] if regulariser and index > 0 else []
    out["name"] = f"{raw['name']}-{'naive' if regulariser is None else regulariser['kind']}"
    return out


def without_new_inputs_plan(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The plan whose added modalities use only their source modality's inputs.

    A stage adding ``pet`` (inputs ``ct, pet``, initialised from ``ct``) adds ``pet-ablation``
    (inputs ``ct``) instead, initialised the same way and trained the same way.

    Raises
    ------
    BaselineError
        If no stage adds a modality with inputs beyond those of the one it starts from.
    """
    plan = validate_plan(raw)
    out = copy.deepcopy(dict(raw))
    known = {m.name: m for s in plan.stages for m in s.add_modalities}
    changed = []
    for stage in out["stages"]:
        for modality in stage.get("add_modalities", []):
            source = modality.get("init_from")
            if not source:
                continue
            old_inputs = list(known[source].input_keys)
            spec = known[modality["name"]]
            if set(spec.input_keys) <= set(old_inputs):
                continue
            renamed = modality["name"] + ABLATION_SUFFIX
            changed.append(f"{modality['name']} → {renamed} (inputs {old_inputs})")
            modality["name"], modality["inputs"] = renamed, old_inputs
            stage["train"] = [
                f"modality/{renamed}" if c == f"modality/{spec.name}" else c
                for c in stage.get("train", [])
            ]
            if stage.get("modalities"):
                stage["modalities"] = [
                    renamed if m == spec.name else m for m in stage["modalities"]
                ]
    if not changed:
        raise BaselineError(
            f"plan {raw['name']!r} adds no modality with new inputs (such as PET over CT): "
            "the no-pet baseline has nothing to ablate"
        )
    logger.info("no-pet baseline: %s", "; ".join(changed))
    out["name"] = f"{raw['name']}-no-pet"
    return out


def without_secure_aggregation(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The plan for a single site: no secure aggregation, one site suffices."""
    out = copy.deepcopy(dict(raw))
    for stage in out["stages"]:
        stage["secure_aggregation"] = False
        stage["min_sites"] = 1
    return out


def single_task_plans(raw: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """One single-stage plan per stage after the first, training it from scratch.

    Stage ``i``'s plan adds the modalities it trains on (without ``init_from``) and its
    objective tasks, trains ``backbone`` + those modalities + those heads (an analytic stage
    trains nothing, as before), and keeps the stage's rounds, local epochs, batch size,
    optimiser, privacy, secure aggregation and site bounds. Regularisers that refer to
    earlier stages (EWC, LwF) are dropped; FedProx stays.

    Returns
    -------
    list of (int, dict)
        The stage index and its plan, named ``<plan>-single-<index>``.

    Raises
    ------
    BaselineError
        If the plan has a single stage (nothing is added later).
    """
    plan = validate_plan(raw)
    if len(plan.stages) < 2:
        raise BaselineError(
            f"plan {raw['name']!r} has one stage: the single-task baseline compares the tasks "
            "added after the first stage, and there are none"
        )
    modalities: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for stage in raw["stages"]:
        modalities.update({m["name"]: m for m in stage.get("add_modalities", [])})
        tasks.update({t["name"]: t for t in stage.get("add_tasks", [])})
    out: list[tuple[int, dict[str, Any]]] = []
    for index in range(1, len(plan.stages)):
        spec = plan.stages[index]
        stage = copy.deepcopy(dict(raw["stages"][index]))
        routes = plan.stage_modalities(index)
        heads = spec.objective_tasks
        # from scratch: no source modality, and the stage's own decoder trains in full (no
        # decoder deltas, which adapt an earlier stage's decoder)
        stage["add_modalities"] = [
            {**copy.deepcopy(modalities[m]), "init_from": None, "decoder_lora": {}} for m in routes
        ]
        stage["add_tasks"] = [copy.deepcopy(tasks[t]) for t in heads]
        stage["objectives"] = []
        stage["modalities"] = []
        stage["train"] = (
            []
            if spec.is_analytic
            else ["backbone", *(f"modality/{m}" for m in routes), *(f"task/{t}" for t in heads)]
        )
        stage["regularisers"] = [
            r for r in stage.get("regularisers", []) if r.get("kind") == "fedprox"
        ]
        single = copy.deepcopy(dict(raw))
        single["stages"] = [stage]
        single["name"] = f"{raw['name'][:50]}-single-{index}"
        out.append((index, single))
    return out


ANALYTIC_SEGMENTATION = {
    "head": "analytic",
    "analytic_features": ["intensity", "squares"],
    "foreground_prior": 0.1,
    "l2": 0.1,
}
"""The analytic head options of :func:`analytic_segmentation_plan`: those the analytic-seg
benchmark chose on the quick scenario's val splits (:mod:`simulations.bench_analytic_seg`)."""

_GRADIENT_ONLY = ("lora_rank", "lora_levels", "prompt", "prompt_jitter", "prompt_drop")
_GRADIENT_STAGE = ("optimizer", "local_epochs", "batch_size", "regularisers", "patience")


def drop_gradient_only_settings(task: dict[str, Any]) -> None:
    """Remove from a task (as a plan dictionary) what only a gradient-trained head can have:
    encoder deltas and box prompting (an analytic head is fitted in closed form)."""
    for key in _GRADIENT_ONLY:
        task.pop(key, None)


def analytic_segmentation_plan(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The UNICON plan with every segmentation head it adds fitted analytically.

    Each stage adding a neural segmentation task (alone) fits it instead as an analytic head
    with :data:`ANALYTIC_SEGMENTATION` in one round on the frozen encoder (``train`` empty;
    its gradient-only settings dropped); decoder deltas that later modalities ask for on such
    a task are dropped (an analytic head has no decoder). A later stage whose objective is
    that task (a PET stage) still trains its own components through the fixed head. Named
    ``<plan>-analytic-seg``.

    Raises
    ------
    BaselineError
        If the plan adds no neural segmentation task in a stage of its own.
    """
    plan = validate_plan(raw)
    out = copy.deepcopy(dict(raw))
    fitted: set[str] = set()
    for stage, spec in zip(out["stages"], plan.stages, strict=True):
        tasks = stage.get("add_tasks", [])
        neural = [t for t in spec.add_tasks if t.kind == "segmentation" and t.head == "neural"]
        if not neural or len(neural) != len(tasks) or stage.get("add_modalities"):
            continue
        for task in tasks:
            drop_gradient_only_settings(task)
            task.update(copy.deepcopy(ANALYTIC_SEGMENTATION))
            fitted.add(task["name"])
        for key in _GRADIENT_STAGE:
            stage.pop(key, None)
        stage.update(rounds=1, train=[])
    if not fitted:
        raise BaselineError(
            f"plan {raw['name']!r} adds no neural segmentation task in a stage of its own "
            "(without new modalities): nothing to fit analytically"
        )
    for stage in out["stages"]:
        for modality in stage.get("add_modalities", []):
            lora = modality.get("decoder_lora") or {}
            modality["decoder_lora"] = {t: r for t, r in lora.items() if t not in fitted}
    out["name"] = f"{raw['name'][:48]}-analytic-seg"
    return out
