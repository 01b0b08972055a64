"""Which connected sites may take part in a stage, from their capabilities.

A site is eligible when it has the images of one of the stage's modality routes and labels
of the stage's objective tasks in its train split, and its own policy (as it reports it)
does not forbid the stage. The site enforces its policy again itself; this check only
avoids sending work that would be refused.

Capabilities come from the site and are untrusted: :func:`capability_problems` checks every
field the coordinator reads (the site name against the one name rule, ε, case counts, policy)
and a node whose capabilities fail it is ineligible with every reason listed, never a crash of
the run. :func:`duplicate_reasons` refuses every node reporting a site name another node also
reports: the coordinator cannot tell which one is genuine, so it trusts neither.
:func:`train_bound` is the most training examples a site may claim in a reply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unicon_model.names import NAME_RULE, is_valid_name
from unicon_model.schema import Plan

SPLITS = ("train", "val", "test")
"""Splits of the case counts a site reports."""

HELD_OUT = (
    "held out of training ([evaluation] holdout_sites): it only evaluates the model after "
    "each stage, as an unseen hospital"
)
"""Why a site listed in the plan's ``holdout_sites`` is never selected for a stage."""


@dataclass(frozen=True)
class Eligibility:
    """A site's eligibility for a stage."""

    node_id: int
    site: str
    eligible: bool
    reasons: tuple[str, ...] = ()


def _is_count(value: object) -> bool:
    """Whether ``value`` is a non-negative whole number (JSON int or integral float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0 and float(value).is_integer()


def _split_count_problems(value: object, where: str) -> list[str]:
    if not isinstance(value, Mapping):
        return [f"{where} must be an object of split -> case count, got {type(value).__name__}"]
    return [
        f"{where}.{split} must be a non-negative whole number, got {count!r}"
        for split, count in value.items()
        if not _is_count(count)
    ]


def _string_list_problem(value: object, where: str, *, optional: bool) -> list[str]:
    if value is None and optional:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [f"{where} must be a list of names, got {value!r:.80}"]
    return []


def capability_problems(capabilities: object) -> list[str]:
    """Every problem of a node's capabilities, as the coordinator reads them.

    Parameters
    ----------
    capabilities
        The decoded capabilities (anything: it comes straight from a reply).

    Returns
    -------
    list of str
        Empty when the capabilities are usable: an object with a ``site`` name following
        the name rule, a finite non-negative ``epsilon`` (when present), ``counts`` with
        whole non-negative case counts per split, a list of ``modalities`` and a ``policy``
        object (or null) whose allowed lists are lists of names.
    """
    if not isinstance(capabilities, Mapping):
        return [f"capabilities must be a JSON object, got {type(capabilities).__name__}"]
    problems: list[str] = []
    site = capabilities.get("site")
    if site is None:
        problems.append("capabilities have no 'site' name")
    elif not is_valid_name(site):
        problems.append(f"site name {site!r:.80} is not a valid name: use {NAME_RULE}")
    epsilon = capabilities.get("epsilon", 0.0)
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
        or epsilon < 0
    ):
        problems.append(f"epsilon must be a finite number >= 0, got {epsilon!r:.80}")
    problems += _string_list_problem(
        capabilities.get("modalities", []), "modalities", optional=False
    )
    counts = capabilities.get("counts", {})
    if not isinstance(counts, Mapping):
        problems.append(f"counts must be an object, got {type(counts).__name__}")
    else:
        problems += _split_count_problems(counts.get("cases", {}), "counts.cases")
        for group in ("tasks", "modalities"):
            entries = counts.get(group, {})
            if not isinstance(entries, Mapping):
                problems.append(f"counts.{group} must be an object, got {type(entries).__name__}")
                continue
            for name, value in entries.items():
                problems += _split_count_problems(value, f"counts.{group}.{name}")
    policy = capabilities.get("policy", {})
    if policy is not None and not isinstance(policy, Mapping):
        problems.append(f"policy must be an object, got {type(policy).__name__}")
    elif policy:
        for key in ("allowed_tasks", "allowed_modalities"):
            problems += _string_list_problem(policy.get(key), f"policy.{key}", optional=True)
    return problems


def _count(capabilities: Mapping[str, Any], *path: str) -> int:
    value: Any = capabilities.get("counts", {})
    for key in path:
        value = value.get(key, {}) if isinstance(value, Mapping) else {}
    return int(value) if _is_count(value) else 0


def _train_cases(capabilities: Mapping[str, Any], task: str) -> int:
    return _count(capabilities, "tasks", task, "train")


def train_bound(plan: Plan, stage_index: int, capabilities: Mapping[str, Any]) -> int:
    """The most training examples a site may report for stage ``stage_index``.

    A site trains on its train cases that have every image of one of the stage's modality
    routes, so the bound is its train case count, tightened by the train count of the
    scarcest image of its best route. Both come from the site's own (checked) capabilities.
    """
    total = _count(capabilities, "cases", "train")
    known = plan.modalities_until(stage_index)
    routes = [known[m] for m in plan.stage_modalities(stage_index)]
    per_route = [
        min(_count(capabilities, "modalities", key, "train") for key in route.input_keys)
        for route in routes
        if route.input_keys
    ]
    return min([total, max(per_route)]) if per_route else total


def split_bound(capabilities: Mapping[str, Any], split: str) -> int:
    """Cases of ``split`` the site reported (the most examples an evaluation may count)."""
    return _count(capabilities, "cases", split)


def duplicate_reasons(sites: Mapping[int, str]) -> dict[int, str]:
    """Why each node whose site name another node also reports is refused.

    Parameters
    ----------
    sites
        Node id -> the site name it reported.

    Returns
    -------
    dict
        Node id -> reason, for every node of a duplicated name. All such nodes are refused,
        not only the later ones: the coordinator cannot tell which one is the genuine site,
        and keeping the first would let an impostor that connects earlier take its place.
    """
    nodes: dict[str, list[int]] = {}
    for node, site in sites.items():
        nodes.setdefault(site, []).append(node)
    return {
        node: (
            f"site name {site!r} is reported by nodes {sorted(nodes[site])}; all are refused "
            "because the coordinator cannot tell which is genuine (give every site a unique "
            "name in its manifest)"
        )
        for node, site in sites.items()
        if len(nodes[site]) > 1
    }


def check_site(
    plan: Plan,
    stage_index: int,
    node_id: int,
    capabilities: Mapping[str, Any],
    *,
    counted: Mapping[str, Sequence[str]] | None = None,
) -> Eligibility:
    """Eligibility of one site for stage ``stage_index``, with every reason against it.

    Malformed capabilities (see :func:`capability_problems`) make the site ineligible with
    those problems as reasons; its name is then ``node-<id>`` unless it reported a valid one.
    A site in the plan's ``[evaluation] holdout_sites`` is never eligible (:data:`HELD_OUT`),
    nor, for an analytic update stage, a site in ``counted`` (site -> the stages whose
    statistics of the updated heads it gave, :func:`server.analytic_updates.counted_sites`).
    """
    stage = plan.stages[stage_index]
    reported = capabilities.get("site") if isinstance(capabilities, Mapping) else None
    site = reported if is_valid_name(reported) else f"node-{node_id}"
    problems = capability_problems(capabilities)
    if problems:
        return Eligibility(node_id, str(site), False, tuple(problems))
    images = set(capabilities.get("modalities", []))
    known = plan.modalities_until(stage_index)
    routes = [known[m] for m in plan.stage_modalities(stage_index)]
    reasons: list[str] = []
    if site in plan.evaluation.holdout_sites:
        reasons.append(HELD_OUT)
    if stage.update_analytic and counted and site in counted:
        reasons.append(
            f"its statistics are already in the analytic head(s) {list(stage.update_analytic)}"
            f" (stage(s) {list(counted[str(site)])}): an update stage adds new sites only"
        )
    if not any(set(r.input_keys) <= images for r in routes):
        needed = [list(r.input_keys) for r in routes]
        reasons.append(f"has images {sorted(images)}, the stage needs one of {needed}")
    tasks = plan.tasks_until(stage_index)
    for task in stage.objective_tasks:
        if task in tasks and tasks[task].self_supervised:
            if not any(
                min(_count(capabilities, "modalities", key, "train") for key in r.input_keys)
                for r in routes
            ):
                reasons.append(f"no training cases with images for self-supervised task {task!r}")
        else:
            source = tasks[task].label_source if task in tasks else task
            if _train_cases(capabilities, source) < 1:
                extension = f" (it extends {source!r} and reads its masks)" * (source != task)
                reasons.append(f"no training cases labelled for task {task!r}{extension}")
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
    return Eligibility(node_id, str(site), not reasons, tuple(reasons))


def holdout_problems(plan: Plan, sites: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every reason the plan's ``holdout_sites`` cannot run over ``sites``, found up front.

    Parameters
    ----------
    plan
        The validated plan (its ``[evaluation] holdout_sites``).
    sites
        Site name -> its capabilities (as :meth:`client.site.Site.capabilities` reports them,
        or built from the site's manifest before anything runs).

    Returns
    -------
    list of str
        Empty when every holdout site is among ``sites`` and every stage still has its
        ``min_sites`` eligible training sites without them; otherwise one line per problem,
        naming the unknown site(s) and the known ones, or the stage, its ``min_sites`` and
        the training sites left.
    """
    holdout = list(plan.evaluation.holdout_sites)
    problems: list[str] = []
    unknown = [s for s in holdout if s not in sites]
    if unknown:
        problems.append(
            f"holdout site(s) {unknown} are not among the sites {sorted(sites)}; name one of "
            "those (a site's name is the `site` of its manifest)"
        )
    for index, stage in enumerate(plan.stages):
        checks = [check_site(plan, index, i, caps) for i, caps in enumerate(sites.values())]
        eligible = [c.site for c in checks if c.eligible]
        if len(eligible) < stage.min_sites:
            problems.append(
                f"stages[{index}] ({stage.name!r}) needs min_sites = {stage.min_sites} eligible "
                f"training site(s), but holding out {holdout} leaves {len(eligible)} "
                f"{sorted(eligible)}; hold out another site, add sites or lower min_sites"
            )
    return problems
