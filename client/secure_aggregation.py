"""The site's side of SecAgg+ (the only client module that knows the protocol).

A secure stage's train messages carry Flower's ``secaggplus_configs`` record. The ClientApp
hands them to Flower's :func:`secaggplus_mod`, which runs the key agreement and masking and
calls :func:`fit` once per round for the vector to mask. :func:`fit` trains through the
same :meth:`client.site.Site.train` as a plain round (policy, privacy budget, audit) and
returns, in the order the server asked for:

- for trained components, the change ``update - received`` (small values, so quantisation
  error is small and the clipping range is rarely reached);
- for analytic stages, the statistics divided by the site's example count (SecAgg+ weights
  them by that count, so the server recovers the exact sums); each task's ``count`` is also
  divided by its samples per case (a patch's voxels for a segmentation head,
  :func:`count_unit`), so it stays within the clipping range and the server recovers it
  exactly by rounding to whole cases.

Values that SecAgg+ would clip to ``±clipping_range`` are counted and reported in the reply's
metrics (``secagg-clipped``) and logged: clipping is never silent.

The reply's metrics also carry where the site's time went (:mod:`client.timing`):
``time/secagg_s`` is the site's SecAgg+ work of the round that can be measured before its
masked vector leaves: the setup and key-sharing steps and the computation of the vector. The
masking itself (inside Flower's mod, after :func:`fit` returns) and the unmasking step come
after the reply is built; they are part of the coordinator's wait for the secure round.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from torch import Tensor

from client import timing
from client.errors import SiteError
from client.site import Site
from unicon_model.analytic import samples_per_case
from unicon_model.protocol import (
    KEY_NUM_EXAMPLES,
    KEY_SECAGG_CLIPPED,
    KEY_SECAGG_REPLY_KEYS,
    KEY_SECAGG_SEND_KEYS,
    STATISTICS_SEPARATOR,
    StageRequest,
)
from unicon_model.schema import Plan, StageSpec

logger = logging.getLogger(__name__)

TIMING_RECORD = "unicon.secagg-timing"
"""Context state record of the SecAgg+ protocol seconds spent this round before the fit."""


def is_secure(message: Message) -> bool:
    """Whether ``message`` belongs to a SecAgg+ exchange."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def fit(message: Message, context: Context, site: Site) -> Message:
    """Train one secure round and reply with the vector SecAgg+ masks (a legacy FitRes)."""
    with timing.recording() as phases:
        return _fit(message, context, site, phases)


def _fit(message: Message, context: Context, site: Site, phases: timing.Recording) -> Message:
    request, arrays, reply_keys = _decode(message)
    stage = request.plan.stages[request.stage_index]
    reply = site.train(request, arrays)
    n = float(reply.metrics.get(KEY_NUM_EXAMPLES, 0.0))
    if n < 1:
        raise SiteError(f"site {site.name} has no examples for stage {stage.name!r}")
    started = time.perf_counter()
    if stage.is_analytic:
        vectors = _statistics_vectors(reply.arrays, request.plan, stage, n)
    else:
        start = site.received_state(request, arrays)
        vectors = {k: v.double() - start[k].double() for k, v in reply.arrays.items()}
    phases.add("secagg", time.perf_counter() - started + _protocol_seconds(context))
    if sorted(vectors) != sorted(reply_keys):
        raise SiteError(
            f"secure round expects arrays {sorted(reply_keys)}, the site produced {sorted(vectors)}"
        )
    metrics: dict[str, bool | bytes | float | int | str] = {
        k: float(v) for k, v in reply.metrics.items()
    }
    metrics[KEY_SECAGG_CLIPPED] = _clipped(context, site, vectors, reply_keys, n)
    with timing.phase("dp"):
        metrics["epsilon"] = site.epsilon()
    with timing.phase("encode"):
        fit_res = FitRes(
            status=Status(code=Code.OK, message="ok"),
            parameters=ndarrays_to_parameters([vectors[k].numpy() for k in reply_keys]),
            num_examples=int(n),
            metrics=metrics,
        )
    metrics.update(timing.metrics(phases))  # the reply's metrics: includes the encoding
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=False), reply_to=message)


def count_unit(plan: Plan, stage: StageSpec, task: str) -> float:
    """The samples one case adds to the ``count`` of ``task``'s statistics in ``stage``.

    :func:`unicon_model.analytic.samples_per_case` of the task (a segmentation head counts
    every voxel of a patch), the rule the coordinator uses too; 1 for a task the stage does
    not fit.
    """
    spec = next((t for t in plan.fitted_heads(stage) if t.name == task), None)
    return 1.0 if spec is None else samples_per_case(spec.kind, plan.data.patch_size)


def _statistics_vectors(
    arrays: dict[str, Tensor], plan: Plan, stage: StageSpec, n: float
) -> dict[str, Tensor]:
    """The statistics divided by ``n``; each ``count`` also by its :func:`count_unit`."""
    vectors = {}
    for key, value in arrays.items():
        task, _, name = key.partition(STATISTICS_SEPARATOR)
        unit = count_unit(plan, stage, task) if name == "count" else 1.0
        vectors[key] = value.double() / (n * unit)
    return vectors


def _decode(message: Message) -> tuple[StageRequest, dict[str, Tensor], list[str]]:
    """The stage request, the arrays received by name, and the names to reply, in order."""
    with timing.phase("decode"):
        fit_ins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fit_ins.config)
    try:
        send_keys = json.loads(str(config.pop(KEY_SECAGG_SEND_KEYS)))
        reply_keys = json.loads(str(config.pop(KEY_SECAGG_REPLY_KEYS)))
    except KeyError as e:
        raise SiteError(f"secure train request lacks {e.args[0]!r}") from e
    with timing.phase("decode"):
        received = parameters_to_ndarrays(fit_ins.parameters)
        if len(received) != len(send_keys):
            raise SiteError(f"secure request has {len(received)} arrays for {len(send_keys)} keys")
        arrays = {
            k: torch.from_numpy(np.array(a)) for k, a in zip(send_keys, received, strict=True)
        }
        request = StageRequest.from_config(config)
    return request, arrays, reply_keys


def _clipped(
    context: Context, site: Site, vectors: dict[str, Tensor], reply_keys: list[str], n: float
) -> int:
    """How many values SecAgg+ will clip to ``±clipping_range`` once weighted (logged)."""
    secagg_state = context.state.config_records.get(RECORD_KEY_STATE)
    clipping = float(str(secagg_state["clipping_range"])) if secagg_state else float("inf")
    max_weight = float(str(secagg_state["max_weight"])) if secagg_state else 1.0
    ratio = n / max_weight
    clipped = int(sum(int((vectors[k].abs() * ratio > clipping).sum()) for k in reply_keys))
    if clipped:
        logger.warning(
            "site %s: %d value(s) exceed the SecAgg+ clipping range ±%g and are clipped; "
            "raise secagg.clipping_range in the plan",
            site.name,
            clipped,
            clipping,
        )
    return clipped


def _protocol_seconds(context: Context) -> float:
    """SecAgg+ seconds spent this round before the fit (read and reset)."""
    record = context.state.config_records.get(TIMING_RECORD)
    seconds = float(str(record.get("seconds", 0.0))) if record else 0.0
    context.state.config_records[TIMING_RECORD] = ConfigRecord({"seconds": 0.0})
    return seconds


def serve(message: Message, context: Context, site_of: Callable[[Context], Site]) -> Message:
    """Run a SecAgg+ protocol step; the masking step calls :func:`fit`.

    The time of each step outside :func:`fit` is added to the round's protocol seconds in
    the context state (reset at the setup step), which :func:`fit` reports as part of
    ``time/secagg_s``.
    """
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    step = str(configs.get(Key.STAGE, "")) if configs else ""
    if step == Stage.SETUP:
        context.state.config_records[TIMING_RECORD] = ConfigRecord({"seconds": 0.0})
    started = time.perf_counter()
    inside = 0.0

    def call_next(msg: Message, ctx: Context) -> Message:
        nonlocal inside
        entered = time.perf_counter()
        try:
            return fit(msg, ctx, site_of(ctx))
        finally:
            inside += time.perf_counter() - entered

    reply = secaggplus_mod(message, context, call_next)
    if step in (Stage.SETUP, Stage.SHARE_KEYS):
        record = context.state.config_records.get(TIMING_RECORD)
        before = float(str(record.get("seconds", 0.0))) if record else 0.0
        spent = time.perf_counter() - started - inside
        context.state.config_records[TIMING_RECORD] = ConfigRecord({"seconds": before + spent})
    return reply
