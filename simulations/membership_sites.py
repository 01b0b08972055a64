"""Which routes a plan trained, which sites took part, and what left each site.

Read from the plan and the registry's round records (see :mod:`simulations.membership`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from unicon_model.schema import Plan

logger = logging.getLogger(__name__)


def trained_routes(plan: Plan) -> dict[str, list[int]]:
    """``task@modality`` -> indices of the stages that trained it (objectives x modalities).

    Self-supervised tasks (``reconstruction``) are left out: they have no label to infer.
    """
    routes: dict[str, list[int]] = {}
    tasks = plan.tasks_until(len(plan.stages) - 1)
    for index, stage in enumerate(plan.stages):
        for task in stage.objective_tasks:
            if task not in tasks or tasks[task].self_supervised:
                continue
            for modality in plan.stage_modalities(index):
                routes.setdefault(f"{task}@{modality}", []).append(index)
    return routes


def _senders(record: Mapping[str, Any]) -> set[str]:
    """Sites whose round reply carried data: accepted plus rejected (both sent it)."""
    sites = record.get("sites") or []
    rejected = record.get("rejected") or {}
    return {str(s) for s in sites} | {str(s) for s in rejected}


def route_sites(plan: Plan, rounds: Sequence[Mapping[str, Any]], stages: Sequence[int]) -> set[str]:
    """Sites that sent data in at least one round of the given stages."""
    names = {plan.stages[i].name for i in stages}
    return {s for r in rounds if r.get("stage") in names for s in _senders(r)}


def data_left_sites(
    plan: Plan,
    rounds: Sequence[Mapping[str, Any]],
    *,
    bytes_up: Mapping[str, int] | None = None,
    bytes_down: Mapping[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """What left each site: bytes, and per stage the components and the rounds it sent.

    Parameters
    ----------
    plan
        The plan as run (its stages' ``trained_components`` are what a reply carries).
    rounds
        The registry's round records (``kind == "round"``; ``sites`` and ``rejected`` name
        the sites whose reply carried data). A round resumed after a crash counts once.
    bytes_up, bytes_down
        Tensor bytes per site, as the coordinator counted them.

    Returns
    -------
    dict
        Site -> ``bytes_up``, ``bytes_down``, ``rounds`` (total) and ``stages``: stage ->
        ``components`` (sorted), ``form`` (``update``, ``masked update`` under SecAgg+,
        ``statistics`` for analytic heads: XᵀX, XᵀY and counts) and ``rounds``. Besides
        these, every evaluation sends aggregate metrics only.
    """
    stages = {s.name: s for s in plan.stages}
    sent: dict[str, dict[str, set[int]]] = {}
    for record in rounds:
        stage = record.get("stage")
        if stage not in stages:
            continue
        for site in _senders(record):
            sent.setdefault(site, {}).setdefault(stage, set()).add(int(record.get("round", 0)))
    out: dict[str, dict[str, Any]] = {}
    for site in sorted(set(sent) | set(bytes_up or {}) | set(bytes_down or {})):
        per_stage: dict[str, Any] = {}
        for name, taken in sent.get(site, {}).items():
            spec = stages[name]
            form = (
                "statistics"
                if spec.is_analytic
                else ("masked update" if spec.secure_aggregation else "update")
            )
            per_stage[name] = {
                "components": sorted(spec.trained_components),
                "form": form,
                "rounds": len(taken),
            }
        ordered = {s.name: per_stage[s.name] for s in plan.stages if s.name in per_stage}
        out[site] = {
            "bytes_up": int((bytes_up or {}).get(site, 0)),
            "bytes_down": int((bytes_down or {}).get(site, 0)),
            "rounds": sum(v["rounds"] for v in ordered.values()),
            "stages": ordered,
        }
    return out
