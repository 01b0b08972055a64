"""Validating a plan from plain data, every problem at once, and warning about valid plans
that are almost certainly not what their author meant."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from unicon_model.errors import PlanError
from unicon_model.schema.base import BACKBONE
from unicon_model.schema.checks import _cross_stage_problems, _header_problems
from unicon_model.schema.component_checks import (
    _decoder_lora_problems,
    _lora_problems,
    _self_supervised_problems,
)
from unicon_model.schema.data import DataSpec
from unicon_model.schema.extension_checks import _extension_problems
from unicon_model.schema.lenient import _format_validation_error, _lenient, _stage_repair
from unicon_model.schema.model import ModelSpec
from unicon_model.schema.plan import Plan
from unicon_model.schema.stages import StageSpec
from unicon_model.schema.update_checks import _update_problems


def _plan_order(problem: str) -> int:
    """Sort key: the plan's own fields first, then the stages in order."""
    match = re.match(r"stages\[(\d+)\]", problem)
    return int(match.group(1)) if match else -1


def validate_plan(data: Mapping[str, Any], *, source: str | None = None) -> Plan:
    """Parse a plan from plain data, reporting every problem at once.

    Field errors (of the plan and of every stage) and cross-stage errors (duplicate names,
    unknown tasks, modalities and components, regularisers without shared weights to
    protect...) are found in one pass: the cross-stage checks run on the valid parts of
    invalid stages too.

    Parameters
    ----------
    data
        The plan as parsed from TOML/JSON.
    source
        File name used in the error message.

    Returns
    -------
    Plan
        The validated, frozen plan.

    Raises
    ------
    PlanError
        With every problem found, each naming its field (``stages[1].privacy.delta``) and
        the fix, the plan's own fields first, then the stages in order.
    """
    problems: list[str] = []
    raw = dict(data)
    raw_stages = raw.pop("stages", None)
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append("stages: the plan needs at least one [[stages]] table")
        raw_stages = []
    stages, lenient, stage_problems = _parse_stages(raw_stages)
    problems += stage_problems
    placeholder = StageSpec(name="placeholder", add_tasks=())
    plan: Plan | None
    try:
        plan = Plan.model_validate({**raw, "stages": stages or [placeholder]})
    except ValidationError as e:
        problems.extend(_format_validation_error("", e))
        plan = None
    model, model_bad = _lenient(ModelSpec, raw.get("model", {}))
    data_spec, data_bad = _lenient(DataSpec, raw.get("data", {}))
    problems += _header_problems(model, model_bad, data_spec, data_bad)
    problems += _cross_stage_problems(lenient)
    problems += _lora_problems(model, model_bad, lenient)
    problems += _self_supervised_problems(data_spec, data_bad, lenient)
    problems += _decoder_lora_problems(lenient)
    problems += _extension_problems(lenient)
    problems += _update_problems(lenient)
    problems.sort(key=_plan_order)
    if problems or plan is None:
        raise PlanError(problems, source)
    return plan


def _parse_stages(
    raw_stages: list[Any],
) -> tuple[list[StageSpec], list[tuple[StageSpec | None, frozenset[str]]], list[str]]:
    """Parse each raw stage strictly and leniently.

    Returns
    -------
    tuple
        The valid stages, every stage's lenient parse with its replaced fields (the stage
        itself when valid, see :func:`~unicon_model.schema.lenient._lenient`), and the field
        errors of the invalid stages.
    """
    adapter = TypeAdapter(StageSpec)
    problems: list[str] = []
    stages: list[StageSpec] = []
    lenient: list[tuple[StageSpec | None, frozenset[str]]] = []
    for i, raw_stage in enumerate(raw_stages):
        try:
            stage = adapter.validate_python(raw_stage)
        except ValidationError as e:
            problems.extend(_format_validation_error(f"stages[{i}]", e))
            lenient.append(_lenient(StageSpec, raw_stage, _stage_repair(i)))
        else:
            stages.append(stage)
            lenient.append((stage, frozenset()))
    return stages, lenient, problems


def plan_warnings(plan: Plan) -> list[str]:
    """Settings that are valid but almost certainly not what the plan's author meant.

    A stage that trains only heads or modality adapters while no earlier stage has trained the
    shared encoder (``backbone``) fits them on the features of a *random, frozen* encoder:
    every component starts from a deterministic random initialisation and a stage trains only
    what its ``train`` lists (by default, the components it adds). The warning names the
    first such stage; it goes away when that stage lists ``backbone`` under ``train``, or
    when ``[model.pretrained]`` seeds the backbone from a file. A stage with ``patience`` but
    ``validate_every = 0`` never stops early: that is warned about too.

    Parameters
    ----------
    plan
        A validated plan.

    Returns
    -------
    list of str
        One line per warning, naming the field (``stages[0].train``) and the fix; empty if
        there is nothing to warn about.
    """
    warnings: list[str] = [
        f"stages[{i}].patience: stage {stage.name!r} sets patience = {stage.patience} but "
        "validate_every = 0, so it never validates and never stops early; set validate_every "
        ">= 1 or remove patience"
        for i, stage in enumerate(plan.stages)
        if stage.patience is not None and stage.validate_every == 0 and not stage.is_analytic
    ]
    pretrained = plan.model.pretrained
    if pretrained is not None and BACKBONE in (pretrained.components or (BACKBONE,)):
        return warnings  # the encoder starts from a pretrained file, not at random
    for i, stage in enumerate(plan.stages):
        trained = stage.trained_components
        if BACKBONE in trained:
            break
        later = any(BACKBONE in s.trained_components for s in plan.stages[i + 1 :])
        if stage.is_analytic:
            what = "fits its analytic head"
            fix = "train 'backbone' in a stage before it"
        else:
            what = f"trains {list(trained)}"
            fix = f"add 'backbone' to its `train`, e.g. train = {json.dumps([BACKBONE, *trained])}"
        warnings.append(
            f"stages[{i}].train: stage {stage.name!r} {what} on a random, frozen encoder: no "
            "earlier stage trains 'backbone' and this stage does not list it"
            + ("" if later else " (nor does any later stage)")
            + f"; {fix}"
        )
        break
    return warnings
