"""Secure aggregation: one round through SecAgg+, only the weighted mean is ever seen."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from server.eligibility import split_bound, train_bound
from server.errors import StageError
from server.round_checks import check_num_examples, parse_epsilon, require_finite
from server.rounds.analytic import fit_heads, samples_per_example, statistics_shapes
from server.rounds.base import RoundContext, RoundStrategy
from server.transport import SecureRoundRequest, tensor_bytes
from unicon_model import protocol
from unicon_model.analytic import RidgeSolution, RidgeStatistics
from unicon_model.components import load_state, select_state
from unicon_model.errors import UniconModelError
from unicon_model.schema import StageSpec

if TYPE_CHECKING:
    from server.secure_aggregation import SecureResult

logger = logging.getLogger(__name__)


def _reply_shapes(context: RoundContext) -> dict[str, list[int]]:
    """Name -> shape of every vector a site sends, sorted by name (statistics or update)."""
    stage = context.stage
    if stage.is_analytic:
        shapes = {
            f"{task}{protocol.STATISTICS_SEPARATOR}{name}": list(value.shape)
            for task, (d, k) in statistics_shapes(context.model, stage).items()
            for name, value in RidgeStatistics.zeros(d, k).to_arrays().items()
        }
    else:
        reference = select_state(context.model, stage.trained_components)
        shapes = {k: list(v.shape) for k, v in reference.items()}
    return dict(sorted(shapes.items()))


def _max_weight(context: RoundContext, nodes: list[int]) -> float:
    """The largest train-case count of ``nodes``: dividing weights by it keeps them near 1."""
    counts = [split_bound(context.host.sites[n].capabilities, "train") for n in nodes]
    return float(max([*counts, 1]))


def _attempt(context: RoundContext, request: SecureRoundRequest) -> SecureResult:
    """One SecAgg+ run; records bytes and the sites' timing."""
    host = context.host
    for node in request["nodes"]:
        host.sites[node].bytes_down += tensor_bytes(dict(request["arrays"]))
    with host.clock.phase("train_wait"):
        result = host.transport.secure_weighted_mean(**request)
    for node, metrics in result.metrics.items():
        if node in host.sites:
            host.clock.add_site(host.sites[node].site, metrics)
    values = sum(math.prod(shape) for shape in request["reply_shapes"].values())
    for node in result.num_examples:
        # masked vectors travel as 64-bit integers, one per value plus the weight
        host.sites[node].bytes_up += 8 * (values + 1)
    return result


def _problems(context: RoundContext, result: SecureResult) -> dict[int, str]:
    """Node -> why the weight (or ε) it reported in a secure round is refused."""
    problems: dict[int, str] = {}
    for node, weight in result.num_examples.items():
        site = context.host.sites[node]
        metrics = result.metrics.get(node, {})
        bound = train_bound(context.host.plan, context.index, site.capabilities)
        problem = check_num_examples({protocol.KEY_NUM_EXAMPLES: weight}, bound)
        epsilon, bad_epsilon = parse_epsilon(metrics.get("epsilon", site.epsilon))
        if problem or bad_epsilon:
            problems[node] = "; ".join(p for p in (problem, bad_epsilon) if p)
        elif epsilon is not None:
            site.epsilon = epsilon
    return problems


def _solve_statistics(
    context: RoundContext, result: SecureResult, total: float, what: str
) -> dict[str, RidgeSolution]:
    """Analytic stage: solve every head from the summed statistics and install it.

    The sites send ``statistics / n`` and each task's ``count`` also divided by its samples
    per case (1, or a patch's voxels for a segmentation head: see
    :mod:`client.secure_aggregation`), so the weighted mean times the total ``n`` is the
    summed statistics with the count in whole cases, rounded to undo the quantisation.
    """
    assert result.mean is not None
    stage = context.stage
    per_example = samples_per_example(context.host.plan, stage)
    statistics = {}
    for task in context.host.plan.fitted_heads(stage):
        prefix = f"{task.name}{protocol.STATISTICS_SEPARATOR}"
        summed = {
            k[len(prefix) :]: (v.double() * total).numpy()
            for k, v in result.mean.items()
            if k.startswith(prefix)
        }
        summed["count"] = np.rint(summed["count"]) * per_example[task.name]
        try:
            statistics[task.name] = RidgeStatistics.from_arrays(summed)
        except UniconModelError as e:
            raise StageError(f"{what} for task {task.name!r}: {e}") from e
    return fit_heads(stage, context.model, statistics)


def _load_update(context: RoundContext, result: SecureResult, what: str) -> None:
    """Training stage: add the mean change (within ``max_update_norm``) to the model."""
    assert result.mean is not None
    stage = context.stage
    reference = select_state(context.model, stage.trained_components)
    norm = math.sqrt(sum(float(result.mean[k].double().square().sum()) for k in reference))
    if norm > stage.max_update_norm:
        raise StageError(
            f"{what} has norm {norm:.4g}, above the stage's max_update_norm "
            f"{stage.max_update_norm:g} that bounds every honest site's change; the "
            "round is discarded and nothing is loaded, checkpointed or committed"
        )
    merged = {k: (reference[k].double() + result.mean[k]).to(reference[k].dtype) for k in reference}
    require_finite(merged, what)
    load_state(context.model, merged, components=stage.trained_components)


class SecureAggregationRound(RoundStrategy):
    """One round through SecAgg+: only the weighted mean of the sites' vectors is seen.

    Training stages receive the mean *change* of the trained components; analytic
    stages the sum of the statistics (mean of ``statistics / n`` times the total ``n``),
    solved per head like a plain analytic round (classification or segmentation; the
    record reports each task's ``condition`` number).
    Per-site update validation is impossible by design; the mean is checked instead
    (finite, and for training stages within ``max_update_norm`` of the global model, which
    every honest site's change is). The weights are visible: a site reporting a
    num-examples that is not finite, not positive or above its train count skews the
    mean, so the round is repeated without it (and skipped if fewer than 2 sites remain).
    """

    name = "secure"

    @classmethod
    def handles(cls, stage: StageSpec) -> bool:
        """Stages with ``secure_aggregation`` on (training or analytic)."""
        return stage.secure_aggregation

    def run(self, context: RoundContext) -> dict[str, Any]:
        """Aggregate securely, load the mean into the model; return the round record."""
        result, rejected = self._aggregate(context)
        record = self._record(context, result, rejected)
        stage, round_ = context.stage, context.round
        if result.mean is None:
            logger.warning(
                "stage %s round %d: secure aggregation halted (%d of %d sites dropped); "
                "the model is unchanged",
                stage.name,
                round_,
                len(result.failed),
                len(context.nodes),
            )
            record["skipped"] = True
            return record
        total = record["num_examples"]
        what = f"stage {stage.name!r} round {round_}: the securely aggregated update"
        require_finite(result.mean, what)
        if stage.is_analytic:
            solutions = _solve_statistics(context, result, total, what)
            record["condition"] = {name: s.condition for name, s in solutions.items()}
        else:
            _load_update(context, result, what)
        losses = [
            (result.metrics[n].get("loss", math.nan), w) for n, w in result.num_examples.items()
        ]
        record["loss"] = sum(v * w for v, w in losses) / total if total else math.nan
        record["site_loss"] = {
            context.site(n): v for n, (v, _) in zip(result.num_examples, losses, strict=True)
        }
        return record

    @staticmethod
    def _aggregate(context: RoundContext) -> tuple[SecureResult, dict[str, str]]:
        """SecAgg+ until every weight is valid: the result and site -> why it was left out."""
        stage, round_ = context.stage, context.round
        request, components = context.host.request(context.index, round_, context.model)
        arrays = {k: v for tensors in components.values() for k, v in tensors.items()}
        reply_shapes = _reply_shapes(context)
        active = list(context.nodes)
        rejected: dict[str, str] = {}
        while True:
            secure = SecureRoundRequest(
                nodes=active,
                config=request.to_config(),
                arrays=arrays,
                reply_shapes=reply_shapes,
                spec=stage.secagg,
                max_weight=_max_weight(context, active),
                server_round=round_,
            )
            result = _attempt(context, secure)
            bad = _problems(context, result)
            if not bad:
                return result, rejected
            for node, problem in bad.items():
                rejected[context.site(node)] = f"{problem}; the round was repeated without it"
                logger.warning(
                    "stage %s round %d: %s: %s", stage.name, round_, context.site(node), problem
                )
            active = [n for n in active if n not in bad]
            if len(active) < 2:
                # SecAgg+ needs two sites: nothing trustworthy to aggregate this round
                empty = dataclasses.replace(result, mean=None, num_examples={}, metrics={})
                return empty, rejected

    @staticmethod
    def _record(
        context: RoundContext, result: SecureResult, rejected: dict[str, str]
    ) -> dict[str, Any]:
        """The round record of a secure round (before the mean is applied)."""
        failed = {context.site(n): "dropped out of secure aggregation" for n in result.failed}
        clipped = {
            context.site(n): int(m.get(protocol.KEY_SECAGG_CLIPPED, 0))
            for n, m in result.metrics.items()
        }
        if any(clipped.values()):
            logger.warning(
                "stage %s round %d: values clipped by SecAgg+ per site %s; raise "
                "secagg.clipping_range",
                context.stage.name,
                context.round,
                clipped,
            )
        return {
            "sites": sorted(context.site(n) for n in result.num_examples),
            "num_examples": sum(result.num_examples.values()),
            "failed": failed,
            "rejected": rejected,
            "secure": True,
            "clipped": clipped,
        }
