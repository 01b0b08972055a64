"""A transport that runs the real ClientApp in this process, one node per site folder.

It builds Flower ``Message`` objects exactly as the ServerApp's ``GridTransport`` does and
hands them to :data:`client.client_app.app`, so the whole message path (records, error
replies, caching by digest) is exercised without a SuperLink or Ray. Used by fast tests and
by single-machine baselines; the simulation engine proper runs the same apps under Flower.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from torch import Tensor

from client.client_app import app as client_app
from server.secure_aggregation import SecureResult, secure_weighted_mean
from server.transport import Incoming, Outgoing
from unicon_model import protocol
from unicon_model.schema import SecureAggregationSpec

ReplyHook = Callable[[Outgoing, Incoming], Incoming]
DropHook = Callable[[Message], bool]


def claim_server_identity() -> None:
    """Give this process the ServerApp's task identity (Flower stamps it on new messages)."""
    if TaskIdentity._run_id is None:
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID


class InProcessGrid:
    """The part of Flower's ``Grid`` that the SecAgg+ workflow uses, calling ClientApps.

    Every message is copied before delivery (as serialisation would), so protocol code
    that mutates records sees what a remote node would.

    Parameters
    ----------
    contexts
        Node id -> the node's context (its node config and persistent state).
    disconnected
        Node ids that never answer.
    drop
        Optional predicate: a message for which it returns ``True`` gets no reply (a node
        dropping out mid-protocol).
    """

    def __init__(
        self,
        contexts: Mapping[int, Context],
        disconnected: set[int],
        drop: DropHook | None = None,
    ) -> None:
        self.contexts = contexts
        self.disconnected = disconnected
        self.drop = drop
        claim_server_identity()

    def get_node_ids(self) -> list[int]:
        """Connected nodes."""
        return [n for n in self.contexts if n not in self.disconnected]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver each message to its node's ClientApp; lost messages get no reply."""
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.disconnected or (self.drop is not None and self.drop(message)):
                continue
            delivered = Message(
                content=copy.deepcopy(message.content),
                dst_node_id=node,
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
            )
            replies.append(client_app(delivered, self.contexts[node]))
        return replies


class InProcessTransport:
    """Sites as in-process ClientApp nodes.

    Parameters
    ----------
    site_dirs
        Site folders, each with a ``manifest.yaml`` (and optionally ``policy.toml``).
    state_root
        Parent of the sites' state directories (one sub-folder per site folder name).
    reply_hook
        Optional function applied to every reply (tests use it to poison or drop replies).
    """

    def __init__(
        self,
        site_dirs: Sequence[Path],
        state_root: Path,
        *,
        reply_hook: ReplyHook | None = None,
    ) -> None:
        self.contexts: dict[int, Context] = {}
        for i, folder in enumerate(site_dirs, start=1):
            node = {
                "manifest": str(Path(folder) / "manifest.yaml"),
                "state-dir": str(state_root / Path(folder).name),
            }
            policy = Path(folder) / "policy.toml"
            if policy.exists():
                node["policy"] = str(policy)
            self.contexts[i] = Context(
                run_id=1,
                node_id=i,
                node_config=node,  # type: ignore[arg-type]
                state=RecordDict(),
                run_config={},
            )
        self.reply_hook = reply_hook
        self.disconnected: set[int] = set()
        self.sent: list[Outgoing] = []
        self.grid = InProcessGrid(self.contexts, self.disconnected)
        self.secure_rounds: list[SecureResult] = []

    def node_ids(self) -> list[int]:
        """Connected nodes (all but the ones marked disconnected)."""
        return [n for n in self.contexts if n not in self.disconnected]

    def exchange(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Incoming]:
        """Call the ClientApp for each message, in order."""
        replies = []
        for m in messages:
            self.sent.append(m)
            if m.node_id in self.disconnected:
                replies.append(Incoming(m.node_id, error_code=-1, error_reason="disconnected"))
                continue
            content = RecordDict()
            if m.config:
                content[protocol.CONFIG] = ConfigRecord(dict(m.config))
            if m.message_type != "query":
                content[protocol.ARRAYS] = ArrayRecord(dict(m.arrays))
            message = Message(content, dst_node_id=m.node_id, message_type=m.message_type)
            reply = client_app(message, self.contexts[m.node_id])
            if reply.has_error():
                incoming = Incoming(
                    m.node_id, error_code=reply.error.code, error_reason=reply.error.reason or ""
                )
            else:
                arrays = reply.content.array_records.get(protocol.ARRAYS)
                metrics = reply.content.metric_records.get(protocol.METRICS)
                config = reply.content.config_records.get(protocol.CONFIG)
                incoming = Incoming(
                    m.node_id,
                    arrays=dict(arrays.to_torch_state_dict()) if arrays and len(arrays) else {},
                    metrics={k: float(v) for k, v in (metrics or {}).items()},  # type: ignore[arg-type]
                    config=dict(config or {}),
                )
            replies.append(self.reply_hook(m, incoming) if self.reply_hook else incoming)
        return replies

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
        """One real SecAgg+ round (Flower's workflow and client mod) over in-process nodes."""
        result = secure_weighted_mean(
            cast(Grid, self.grid),
            nodes,
            config=config,
            arrays=arrays,
            reply_shapes=reply_shapes,
            spec=spec,
            max_weight=max_weight,
            server_round=server_round,
        )
        self.secure_rounds.append(result)
        return result
