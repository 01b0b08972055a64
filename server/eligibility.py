"""Which connected sites may take part in a stage, from their capabilities.

A site is eligible when it has the images of one of the stage's modality routes and labels
of the stage's objective tasks in its train split, and its own policy (as it reports it)
does not forbid the stage. The site enforces its policy again itself; this check only
avoids sending work that would be refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from unicon_model.schema import Plan


@dataclass(frozen=True)
class Eligibility:
    """A site's eligibility for a stage."""

    node_id: int
    site: str
    eligible: bool
    reasons: tuple[str, ...] = ()


def _train_cases(capabilities: Mapping[str, Any], task: str) -> int:
    counts = capabilities.get("counts", {})
    per_task = counts.get("tasks", {}).get(task, {})
    return int(per_task.get("train", 0))


def check_site(
    plan: Plan, stage_index: int, node_id: int, capabilities: Mapping[str, Any]
) -> Eligibility:
    """Eligibility of one site for stage ``stage_index``, with every reason against it."""
    stage = plan.stages[stage_index]
    site = str(capabilities.get("site", f"node-{node_id}"))
    images = set(capabilities.get("modalities", []))
    known = plan.modalities_until(stage_index)
    routes = [known[m] for m in plan.stage_modalities(stage_index)]
    reasons: list[str] = []
    if not any(set(r.input_keys) <= images for r in routes):
        needed = [list(r.input_keys) for r in routes]
        reasons.append(f"has images {sorted(images)}, the stage needs one of {needed}")
    for task in stage.objective_tasks:
        if _train_cases(capabilities, task) < 1:
            reasons.append(f"no training cases labelled for task {task!r}")
    policy = capabilities.get("policy", {}) or {}
    allowed_tasks = policy.get("allowed_tasks")
    if allowed_tasks is not None:
        reasons += [
            f"its policy does not allow task {t!r}"
            for t in stage.objective_tasks
            if t not in allowed_tasks
        ]
    allowed_modalities = policy.get("allowed_modalities")
    if allowed_modalities is not None and not any(r.name in allowed_modalities for r in routes):
        reasons.append(f"its policy allows modalities {allowed_modalities} only")
    if policy.get("require_privacy") and stage.privacy.mode != "local":
        reasons.append("its policy requires local differential privacy")
    return Eligibility(node_id, site, not reasons, tuple(reasons))
