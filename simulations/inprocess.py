"""A transport that runs the real ClientApp in this process, one node per site folder.

It builds Flower ``Message`` objects exactly as the ServerApp's ``GridTransport`` does and
hands them to :data:`client.client_app.app`, so the whole message path (records, error
replies, caching by digest) is exercised without a SuperLink or Ray. Used by fast tests and
by single-machine baselines; the simulation engine proper runs the same apps under Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.client_app import app as client_app
from server.transport import Incoming, Outgoing
from unicon_model import protocol

ReplyHook = Callable[[Outgoing, Incoming], Incoming]


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
            node = {"manifest": str(Path(folder) / "manifest.yaml"),
                    "state-dir": str(state_root / Path(folder).name)}
            policy = Path(folder) / "policy.toml"
            if policy.exists():
                node["policy"] = str(policy)
            self.contexts[i] = Context(run_id=1, node_id=i, node_config=node,  # type: ignore[arg-type]
                                       state=RecordDict(), run_config={})
        self.reply_hook = reply_hook
        self.disconnected: set[int] = set()
        self.sent: list[Outgoing] = []

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
                incoming = Incoming(m.node_id, error_code=reply.error.code,
                                    error_reason=reply.error.reason)
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
