"""Analytic stages: the sites' ridge statistics, summed and solved once at the coordinator."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from server.errors import StageError
from server.round_checks import checked_replies, require_finite
from server.rounds.base import RoundContext, RoundStrategy
from server.transport import Incoming
from server.validation import structural_problems
from unicon_model import protocol
from unicon_model.analytic import (
    RidgeHead,
    RidgeSolution,
    RidgeStatistics,
    merge_statistics,
    samples_per_case,
)
from unicon_model.errors import UniconModelError
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, StageSpec

logger = logging.getLogger(__name__)


def ridge_head(model: UniconModel, task: str) -> RidgeHead:
    """The analytic head of ``task`` in ``model``."""
    head = model.tasks[task]
    assert isinstance(head, RidgeHead), f"task {task!r} has no analytic head"
    return head


def statistics_shapes(model: UniconModel, stage: StageSpec) -> dict[str, tuple[int, int]]:
    """Task -> ``(d, k)`` of the statistics a site sends for each of the stage's heads."""
    return {
        t.name: ridge_head(model, t.name).statistics_shape
        for t in stage.fitted_heads(model.task_specs)
    }


def samples_per_example(plan: Plan, stage: StageSpec) -> dict[str, float]:
    """Task -> the most statistics samples one case may add: 1, or a patch's voxels
    (segmentation heads count every voxel)."""
    return {
        t.name: samples_per_case(t.kind, plan.data.patch_size) for t in plan.fitted_heads(stage)
    }


def parse_statistics(
    stage: StageSpec,
    reply: Incoming,
    shapes: Mapping[str, tuple[int, int]],
    per_example: Mapping[str, float] | None = None,
) -> tuple[dict[str, RidgeStatistics], str]:
    """A reply's ridge statistics per task, or the problem that refuses them.

    A site sends the statistics of the stage's tasks (the keys of ``shapes``) it has labels
    for (all five arrays of a task, or none), of the task's ``shapes`` ``(d, k)``; each
    task's ``count`` may not exceed the reply's num-examples times the task's
    ``per_example`` (default 1).
    """
    expected: dict[str, Tensor] = {}
    present = []
    for name in shapes:
        prefix = f"{name}{protocol.STATISTICS_SEPARATOR}"
        if any(k.startswith(prefix) for k in reply.arrays):
            present.append(name)
            zeros = RidgeStatistics.zeros(*shapes[name]).to_arrays()
            expected.update({prefix + k: torch.from_numpy(v) for k, v in zeros.items()})
    if not present:
        return {}, "the reply holds no statistics of the stage's tasks"
    problems = structural_problems(reply.arrays, expected)
    if problems:
        return {}, "; ".join(problems)
    examples = float(reply.metrics[protocol.KEY_NUM_EXAMPLES])
    parsed: dict[str, RidgeStatistics] = {}
    for name in present:
        prefix = f"{name}{protocol.STATISTICS_SEPARATOR}"
        arrays = {
            k[len(prefix) :]: v.double().numpy()
            for k, v in reply.arrays.items()
            if k.startswith(prefix)
        }
        try:
            parsed[name] = RidgeStatistics.from_arrays(arrays)
        except UniconModelError as e:
            return {}, f"task {name!r}: {e}"
        limit = examples * (per_example or {}).get(name, 1.0)
        if parsed[name].count > limit:
            return {}, (
                f"task {name!r}: count {parsed[name].count} exceeds the reply's "
                f"{protocol.KEY_NUM_EXAMPLES} {examples:g}"
                + (f" times {limit / examples:g} samples per case" if limit != examples else "")
            )
    return parsed, ""


def fit_heads(
    stage: StageSpec,
    model: UniconModel,
    statistics: Mapping[str, RidgeStatistics],
) -> dict[str, RidgeSolution]:
    """Solve every analytic head of ``stage`` from its summed statistics and install it.

    Parameters
    ----------
    stage
        The analytic stage: the heads it adds, and those it updates (``update_analytic``),
        each solved with its ``l2``.
    model
        The model whose heads receive the solutions.
    statistics
        Task -> the statistics summed over the sites (plainly or by SecAgg+).

    A head the stage updates adds the statistics to the cumulative ones it keeps
    (incremental ridge: new sites without revisiting old data); a head the stage adds starts
    from none.

    Returns
    -------
    dict
        Task -> the solution installed, with the condition number of its system.

    Raises
    ------
    StageError
        A task without statistics, or whose solution fails (no samples, not finite).
    """
    solutions = {}
    for task in stage.fitted_heads(model.task_specs):
        if task.name not in statistics:
            raise StageError(
                f"analytic stage {stage.name!r}: no valid statistics for task {task.name!r}"
            )
        head = ridge_head(model, task.name)
        try:
            accumulate = task.name in stage.update_analytic
            solution = head.fit(statistics[task.name], l2=task.l2, accumulate=accumulate)
        except UniconModelError as e:
            raise StageError(f"analytic stage {stage.name!r} task {task.name!r}: {e}") from e
        require_finite(
            {
                f"{task.name}.weight": torch.from_numpy(np.asarray(solution.weight, np.float64)),
                f"{task.name}.bias": torch.from_numpy(np.asarray(solution.bias, np.float64)),
            },
            f"analytic stage {stage.name!r}: the ridge solution",
        )
        logger.info(
            "analytic stage %s task %s: solved from %d samples, condition number %.3g",
            stage.name,
            task.name,
            statistics[task.name].count,
            solution.condition,
        )
        solutions[task.name] = solution
    return solutions


class AnalyticRound(RoundStrategy):
    """The one round of an analytic stage: summed ridge statistics, solved per task.

    A reply is refused (``rejected``) for a malformed config, a bad ``num-examples`` or
    statistics that fail :func:`parse_statistics`; the round fails when no site (or no
    site for some task) sent valid statistics. The record reports each task's condition
    number (``condition``) of the regularised system solved.
    """

    name = "analytic"

    @classmethod
    def handles(cls, stage: StageSpec) -> bool:
        """Analytic stages without secure aggregation."""
        return not stage.secure_aggregation and stage.is_analytic

    def run(self, context: RoundContext) -> dict[str, Any]:
        """Collect the statistics, solve every task and set the heads; return the record."""
        host, stage = context.host, context.stage
        request, components = host.request(context.index, 1, context.model)
        replies, malformed = host.send(
            "train", context.nodes, request, components, stage.round_timeout
        )
        failed = {context.site(r.node_id): r.error_reason for r in replies if not r.ok}
        rejected = checked_replies(host.plan, context.index, host.sites, replies, malformed)
        shapes = statistics_shapes(context.model, stage)
        per_example = samples_per_example(host.plan, stage)
        statistics: dict[str, list[RidgeStatistics]] = {name: [] for name in shapes}
        accepted = []
        for reply in replies:
            site = context.site(reply.node_id)
            if not reply.ok or site in rejected:
                continue
            parsed, problem = parse_statistics(stage, reply, shapes, per_example)
            if problem:
                rejected[site] = problem
                logger.warning("rejected the statistics of %s: %s", site, problem)
                continue
            accepted.append(reply)
            for name, value in parsed.items():
                statistics[name].append(value)
        if not accepted:
            raise StageError(
                f"analytic stage {stage.name!r}: no site returned valid statistics "
                f"(rejected: {rejected}, failed: {failed})"
            )
        merged = {name: merge_statistics(v) for name, v in statistics.items() if v}
        solutions = fit_heads(stage, context.model, merged)
        return {
            "sites": [context.site(r.node_id) for r in accepted],
            "num_examples": sum(float(r.metrics[protocol.KEY_NUM_EXAMPLES]) for r in accepted),
            "rejected": rejected,
            "failed": failed,
            "condition": {name: s.condition for name, s in solutions.items()},
        }
