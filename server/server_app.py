"""The Flower ServerApp of the coordinator: a thin adapter around :class:`Coordinator`.

Run config (``flwr run . --run-config 'plan="..." registry="..."'``, or the plan launcher):
:class:`server.run_config.RunConfig` declares every key (``plan`` and ``registry`` are
required; ``stage``, ``site-wait``, ``query-timeout``, ``evaluate-timeout`` and
``max-message-mb``, the fixed cap on a reply's array bytes, are optional). Every reply's
arrays are checked against the plan's model size (capped by that limit) before they are
decoded (:mod:`unicon_model.wire`); a reply that fails is that site's error, never the
run's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Unpack

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.coordinator import Coordinator
from server.registry import Registry
from server.run_config import RunConfig
from server.secure_aggregation import SecureResult, secure_weighted_mean
from server.transport import Incoming, Outgoing, SecureRoundRequest
from unicon_model import protocol, wire
from unicon_model.schema import load_plan

logger = logging.getLogger(__name__)

app = ServerApp()


class GridTransport:
    """:class:`server.transport.Transport` over a Flower ``Grid``.

    Parameters
    ----------
    grid : Grid
        Flower's grid of the run.
    max_message_bytes : int
        Bound on a reply's array bytes (each array and all together), checked before any
        array is decoded; :func:`unicon_model.wire.message_bound` computes it from the plan.
    """

    def __init__(
        self, grid: Grid, *, max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.grid = grid
        self.max_message_bytes = max_message_bytes

    def node_ids(self) -> list[int]:
        """Connected SuperNodes."""
        return list(self.grid.get_node_ids())

    def exchange(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Incoming]:
        """Send and wait (at most ``timeout`` s); nodes that do not answer get an error."""
        if not messages:
            return []
        outgoing = []
        for m in messages:
            content = RecordDict()
            if m.config:
                content[protocol.CONFIG] = ConfigRecord(dict(m.config))
            if m.message_type != "query":
                content[protocol.ARRAYS] = ArrayRecord(dict(m.arrays))
            outgoing.append(Message(content, dst_node_id=m.node_id, message_type=m.message_type))
        replies = {
            r.metadata.src_node_id: r for r in self.grid.send_and_receive(outgoing, timeout=timeout)
        }
        result = []
        for m in messages:
            reply = replies.get(m.node_id)
            if reply is None:
                result.append(
                    Incoming(
                        m.node_id, error_code=-1, error_reason=f"no reply within {timeout:.0f} s"
                    )
                )
            elif reply.has_error():
                result.append(
                    Incoming(
                        m.node_id,
                        error_code=reply.error.code,
                        error_reason=reply.error.reason or "",
                    )
                )
            else:
                result.append(self._decode(m.node_id, reply))
        return result

    def _decode(self, node_id: int, reply: Message) -> Incoming:
        """A reply's records, or an error naming what is wrong (that site only is dropped)."""
        content = reply.content
        try:
            for name, record in content.array_records.items():
                if name != protocol.ARRAYS:  # checked, never decoded
                    wire.check_arrays(
                        record, max_bytes=self.max_message_bytes, what=f"reply record {name!r}"
                    )
            arrays = wire.decode_arrays(
                content.array_records.get(protocol.ARRAYS, ArrayRecord()),
                max_bytes=self.max_message_bytes,
                what="reply arrays",
            )
            metrics: dict[str, float] = {}
            for key, value in (content.metric_records.get(protocol.METRICS) or {}).items():
                if isinstance(value, list):
                    raise protocol.ProtocolError(f"reply metric {key!r} is a list, not a number")
                metrics[key] = float(value)
        except (protocol.ProtocolError, ValueError, TypeError) as e:
            logger.warning("node %d: reply refused: %s", node_id, e)
            return Incoming(
                node_id, error_code=protocol.ERROR_INVALID, error_reason=f"reply refused: {e}"
            )
        config = content.config_records.get(protocol.CONFIG)
        return Incoming(node_id, arrays=arrays, metrics=metrics, config=dict(config or {}))

    def secure_weighted_mean(self, **request: Unpack[SecureRoundRequest]) -> SecureResult:
        """One SecAgg+ round over the grid (see :mod:`server.secure_aggregation`)."""
        return secure_weighted_mean(self.grid, request)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the plan named in the run config against the connected sites."""
    config = RunConfig.from_flower(context.run_config, require=("plan", "registry"))
    plan = load_plan(config.plan)
    registry = Registry(config.registry)
    bound = wire.message_bound(plan, config.max_message_bytes)
    logger.info("replies may carry at most %d bytes of arrays", bound)

    def report(event: dict[str, object]) -> None:
        logger.info("progress %s", json.dumps(event, default=str))

    coordinator = Coordinator(
        plan,
        registry,
        GridTransport(grid, max_message_bytes=bound),
        site_wait=config.site_wait,
        query_timeout=config.query_timeout,
        evaluate_timeout=config.evaluate_timeout,
        on_progress=report,
    )
    progress = coordinator.run(only_stage=config.stage or None)
    logger.info("plan %s: completed stages %s", plan.name, progress.completed_stages)
