"""Secure aggregation of one round through Flower's SecAgg+ (the only module that knows it).

Flower 1.41 offers SecAgg+ only through its legacy workflow: :class:`SecAggPlusWorkflow`
with a :class:`LegacyContext` and a legacy ``Strategy``. This module runs that workflow for
exactly one round, with a strategy that sends every selected node the same request and
captures what the workflow unmasks: the example-weighted mean of the nodes' vectors. The
server never sees an individual node's vector, only the masked sum.

What each site sends (see :mod:`client.secure_aggregation`) is its *change* to the trained
components (``update - received``), or for analytic stages its statistics divided by its
example count. SecAgg+ multiplies each vector by ``num_examples / max_weight``, clips it to
``±clipping_range`` and quantises it; :func:`secure_weighted_mean` therefore chooses
``max_weight`` as the largest train-case count among the selected sites (so weights are not
squashed towards 0 and quantisation error stays small) and the sites report how many values
they had to clip, so clipping is never silent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from torch import Tensor

from server.transport import SecureRoundRequest
from unicon_model import protocol

logger = logging.getLogger(__name__)


@dataclass
class SecureResult:
    """What a secure round reveals to the server.

    Attributes
    ----------
    mean
        Example-weighted mean of the nodes' vectors (``None`` if the protocol halted).
    num_examples
        Node id -> examples it reported (weights are metadata, not hidden by SecAgg+).
    metrics
        Node id -> its scalar metrics (loss, ε, clipped count).
    failed
        Node ids that dropped out or replied with an error.
    """

    mean: dict[str, Tensor] | None
    num_examples: dict[int, float] = field(default_factory=dict)
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)


class _OneRoundStrategy(Strategy):
    """A legacy strategy that asks fixed nodes to fit and captures the unmasked mean."""

    def __init__(self, grid: Grid, nodes: Sequence[int], config: Mapping[str, Scalar]) -> None:
        self.grid = grid
        self.nodes = list(nodes)
        self.config = dict(config)
        self.aggregated: Parameters | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.failures: list[Any] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        fit_ins = FitIns(parameters, dict(self.config))
        return [(GridClientProxy(n, self.grid, 0), fit_ins) for n in self.nodes]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[Any],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAgg+ replaced every result's parameters by the unmasked weighted mean.
        self.results, self.failures = results, failures
        self.aggregated = results[0][1].parameters if results else None
        return self.aggregated, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[Any],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        return None


MODULUS_RANGE = 2**32
"""SecAgg+'s modulus (Flower's default and maximum)."""


def safe_quantization_range(nodes: int) -> int:
    """The most quantisation levels for which the sum of ``nodes`` vectors cannot overflow.

    Each node's quantised values lie in ``[0, levels)``; their sum must stay below the
    modulus, so ``levels <= 2**32 / nodes`` (rounded down to a power of two, at most 2**30).
    """
    levels = 2 ** math.floor(math.log2(MODULUS_RANGE / max(nodes, 1)))
    return int(min(levels // 2, 2**30))


def secure_weighted_mean(grid: Grid, request: SecureRoundRequest) -> SecureResult:
    """Run one SecAgg+ round and return the example-weighted mean of the nodes' vectors.

    Parameters
    ----------
    grid
        The ServerApp's grid (or an in-process equivalent).
    request
        The nodes to ask, what they receive and return, the stage's SecAgg+ settings, the
        bound on any node's weight and the round (:class:`server.transport.SecureRoundRequest`).
    """
    strategy = _OneRoundStrategy(grid, request["nodes"], _fit_config(request))
    context = _legacy_context(request, strategy)
    workflow = _workflow(request)
    workflow(grid, context)
    return _result(request, strategy)


def _fit_config(request: SecureRoundRequest) -> dict[str, Scalar]:
    """The stage request plus the names of the arrays sent and expected back, in order."""
    return {
        **dict(request["config"]),
        protocol.KEY_SECAGG_SEND_KEYS: json.dumps(sorted(request["arrays"])),
        protocol.KEY_SECAGG_REPLY_KEYS: json.dumps(list(request["reply_shapes"])),
    }


def _legacy_context(request: SecureRoundRequest, strategy: Strategy) -> LegacyContext:
    """The legacy context of the round: its number and the arrays sent, sorted by name."""
    arrays = request["arrays"]
    state = RecordDict()
    state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {Key.CURRENT_ROUND: request["server_round"]}
    )
    parameters = ndarrays_to_parameters([arrays[k].detach().cpu().numpy() for k in sorted(arrays)])
    state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        parameters, keep_input=True
    )
    return LegacyContext(
        context=Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        strategy=strategy,
    )


def _workflow(request: SecureRoundRequest) -> SecAggPlusWorkflow:
    """The SecAgg+ workflow for the round's nodes and the stage's settings (logged)."""
    spec, nodes = request["spec"], request["nodes"]
    quantization = spec.quantization_range or safe_quantization_range(len(nodes))
    shares = min(spec.num_shares, len(nodes))
    threshold = min(spec.reconstruction_threshold, shares - 1) if shares > 2 else shares
    workflow = SecAggPlusWorkflow(
        num_shares=shares if shares > 2 else 1,
        reconstruction_threshold=threshold if shares > 2 else 1,
        max_weight=float(request["max_weight"]),
        clipping_range=spec.clipping_range,
        quantization_range=quantization,
        timeout=spec.timeout,
    )
    logger.info(
        "SecAgg+ round %d over %d node(s): shares %s, threshold %s, max_weight %g, "
        "clipping ±%g, %d levels",
        request["server_round"],
        len(nodes),
        shares,
        threshold,
        request["max_weight"],
        spec.clipping_range,
        quantization,
    )
    return workflow


def _result(request: SecureRoundRequest, strategy: _OneRoundStrategy) -> SecureResult:
    """What the round revealed: each node's weight and metrics, and the unmasked mean."""
    nodes, reply_shapes = request["nodes"], request["reply_shapes"]
    result = SecureResult(mean=None)
    for proxy, fit_res in strategy.results:
        node = int(proxy.node_id)
        result.num_examples[node] = float(fit_res.num_examples)
        result.metrics[node] = {
            k: float(v) for k, v in fit_res.metrics.items() if isinstance(v, int | float)
        }
    result.failed = [n for n in nodes if n not in result.num_examples]
    if strategy.aggregated is None:
        logger.warning("SecAgg+ round %d halted (too many dropouts)", request["server_round"])
        return result
    reply_keys = list(reply_shapes)
    vectors = parameters_to_ndarrays(strategy.aggregated)
    if len(vectors) != len(reply_keys):
        raise ValueError(
            f"SecAgg+ returned {len(vectors)} arrays, expected {len(reply_keys)} ({reply_keys})"
        )
    mean = {}
    for key, vector in zip(reply_keys, vectors, strict=True):
        shape = tuple(reply_shapes[key])
        mean[key] = torch.from_numpy(np.asarray(vector, dtype=np.float64).reshape(shape))
    result.mean = mean
    return result
