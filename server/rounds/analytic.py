"""Analytic stages: the sites' ridge statistics, summed and solved once at the coordinator."""

from __future__ import annotations

import logging
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
from unicon_model.analytic import AnalyticHead, RidgeStatistics, merge_statistics
from unicon_model.errors import UniconModelError
from unicon_model.layers import pooled_size
from unicon_model.schema import StageSpec

logger = logging.getLogger(__name__)


def parse_statistics(
    stage: StageSpec, reply: Incoming, dim: int
) -> tuple[dict[str, RidgeStatistics], str]:
    """A reply's ridge statistics per task, or the problem that refuses them.

    A site sends the statistics of the stage's tasks it has labels for (all five arrays
    of a task, or none); each task's ``count`` may not exceed the reply's num-examples.
    """
    expected: dict[str, Tensor] = {}
    present = []
    for task in stage.add_tasks:
        prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
        if any(k.startswith(prefix) for k in reply.arrays):
            present.append(task.name)
            zeros = RidgeStatistics.zeros(dim, task.num_outputs).to_arrays()
            expected.update({prefix + k: torch.from_numpy(v) for k, v in zeros.items()})
    if not present:
        return {}, "the reply holds no statistics of the stage's tasks"
    problems = structural_problems(reply.arrays, expected)
    if problems:
        return {}, "; ".join(problems)
    limit = float(reply.metrics[protocol.KEY_NUM_EXAMPLES])
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
        if parsed[name].count > limit:
            return {}, (
                f"task {name!r}: count {parsed[name].count} exceeds the reply's "
                f"{protocol.KEY_NUM_EXAMPLES} {limit:g}"
            )
    return parsed, ""


def solve_statistics(
    stage: StageSpec, statistics: dict[str, list[RidgeStatistics]]
) -> dict[str, tuple[Any, Any]]:
    """Task -> the ridge solution ``(weight, bias)`` of its merged statistics (finite)."""
    solutions = {}
    for task in stage.add_tasks:
        if not statistics[task.name]:
            raise StageError(
                f"analytic stage {stage.name!r}: no valid statistics for task {task.name!r}"
            )
        try:
            weight, bias = merge_statistics(statistics[task.name]).solve(l2=task.l2)
        except UniconModelError as e:
            raise StageError(f"analytic stage {stage.name!r} task {task.name!r}: {e}") from e
        solutions[task.name] = (weight, bias)
        require_finite(
            {
                f"{task.name}.weight": torch.from_numpy(np.asarray(weight, dtype=np.float64)),
                f"{task.name}.bias": torch.from_numpy(np.asarray(bias, dtype=np.float64)),
            },
            f"analytic stage {stage.name!r}: the ridge solution",
        )
    return solutions


class AnalyticRound(RoundStrategy):
    """The one round of an analytic stage: summed ridge statistics, solved per task.

    A reply is refused (``rejected``) for a malformed config, a bad ``num-examples`` or
    statistics that fail :func:`parse_statistics`; the round fails when no site (or no
    site for some task) sent valid statistics.
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
        dim = pooled_size(host.plan.model.widths)
        statistics: dict[str, list[RidgeStatistics]] = {t.name: [] for t in stage.add_tasks}
        accepted = []
        for reply in replies:
            site = context.site(reply.node_id)
            if not reply.ok or site in rejected:
                continue
            parsed, problem = parse_statistics(stage, reply, dim)
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
        for name, (weight, bias) in solve_statistics(stage, statistics).items():
            head = context.model.tasks[name]
            assert isinstance(head, AnalyticHead)
            head.set_solution(weight, bias)
        return {
            "sites": [context.site(r.node_id) for r in accepted],
            "num_examples": sum(float(r.metrics[protocol.KEY_NUM_EXAMPLES]) for r in accepted),
            "rejected": rejected,
            "failed": failed,
        }
