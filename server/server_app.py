"""The Flower ServerApp of the coordinator: a thin adapter around :class:`Coordinator`.

Run config (``flwr run . --run-config 'plan="..." registry="..."'``, or the plan launcher):
``plan`` path of the plan file; ``registry`` registry directory; optional ``stage`` (run
only that stage), ``site-wait`` (seconds to wait for eligible sites, default 120) and
``query-timeout`` (default 60) and ``evaluate-timeout`` (default 600).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from server.coordinator import Coordinator
from server.registry import Registry
from server.secure_aggregation import SecureResult, secure_weighted_mean
from server.transport import Incoming, Outgoing
from unicon_model import protocol
from unicon_model.schema import SecureAggregationSpec, load_plan

logger = logging.getLogger(__name__)

app = ServerApp()


class GridTransport:
    """:class:`server.transport.Transport` over a Flower ``Grid``."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

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
                content = reply.content
                arrays = content.array_records.get(protocol.ARRAYS)
                metrics = content.metric_records.get(protocol.METRICS)
                config = content.config_records.get(protocol.CONFIG)
                result.append(
                    Incoming(
                        m.node_id,
                        arrays=dict(arrays.to_torch_state_dict()) if arrays and len(arrays) else {},
                        metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                        config=dict(config or {}),
                    )
                )
        return result

    def secure_weighted_mean(
        self,
        nodes: Sequence[int],
        *,
        config: Mapping[str, Any],
        arrays: Mapping[str, Tensor],
        reply_shapes: Mapping[str, Sequence[int]],
        spec: SecureAggregationSpec,
        max_weight: float,
        server_round: int,
    ) -> SecureResult:
        """One SecAgg+ round over the grid (see :mod:`server.secure_aggregation`)."""
        return secure_weighted_mean(
            self.grid,
            nodes,
            config=config,
            arrays=arrays,
            reply_shapes=reply_shapes,
            spec=spec,
            max_weight=max_weight,
            server_round=server_round,
        )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the plan named in the run config against the connected sites."""
    config = context.run_config
    plan = load_plan(str(config["plan"]))
    registry = Registry(str(config["registry"]))
    stage = str(config.get("stage", "")) or None

    def report(event: dict[str, object]) -> None:
        logger.info("progress %s", json.dumps(event, default=str))

    coordinator = Coordinator(
        plan,
        registry,
        GridTransport(grid),
        site_wait=float(config.get("site-wait", 120.0)),
        query_timeout=float(config.get("query-timeout", 60.0)),
        evaluate_timeout=float(config.get("evaluate-timeout", 600.0)),
        on_progress=report,
    )
    progress = coordinator.run(only_stage=stage)
    logger.info("plan %s: completed stages %s", plan.name, progress.completed_stages)
