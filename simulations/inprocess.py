"""The ServerApp's own transport over an in-process grid: one ClientApp node per site folder.

:class:`InProcessTransport` is :class:`server.server_app.GridTransport` (the same message
encoding and decoding, the same SecAgg+ path) over :class:`InProcessGrid`, which hands each
message, copied as serialisation would, to :data:`client.client_app.app`. So fast tests and
single-machine baselines exercise the whole message path (records, error replies, caching by
digest, SecAgg+ with Flower's workflow and client mod) without a SuperLink or Ray; the
simulation engine proper runs the same apps under Flower.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Unpack, cast

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client.client_app import app as client_app
from client.site_folder import check_unique_sites, manifest_in, site_state_dir
from server.secure_aggregation import SecureResult
from server.server_app import GridTransport
from server.transport import Incoming, Outgoing, SecureRoundRequest

ReplyHook = Callable[[Outgoing, Incoming], Incoming]
DropHook = Callable[[Message], bool]


@contextlib.contextmanager
def seeded_numpy(seed: int) -> Iterator[None]:
    """Seed NumPy's global random state for a run, and restore it afterwards.

    Flower's SecAgg+ draws its stochastic rounding from the global state, so without this an
    in-process run's secure stages (and everything trained after them) would depend on
    whatever ran before in the same process.
    """
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


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


class InProcessTransport(GridTransport):
    """Sites as in-process ClientApp nodes.

    Parameters
    ----------
    site_dirs
        Site folders, each with a manifest (and optionally ``policy.toml``), each declaring a
        distinct site name.
    state_root
        Parent of the sites' state directories (one sub-folder per site *name*, as declared
        in the manifest, never per folder name).
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
        names = check_unique_sites(site_dirs)
        for i, folder in enumerate(site_dirs, start=1):
            node = {
                "manifest": str(manifest_in(folder)),
                "state-dir": str(site_state_dir(state_root, names[Path(folder)])),
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
        self.in_process_grid = InProcessGrid(self.contexts, self.disconnected)
        self.secure_rounds: list[SecureResult] = []
        super().__init__(cast(Grid, self.in_process_grid))

    def exchange(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Incoming]:
        """Deliver through the in-process grid; record what was sent; apply the reply hook."""
        self.sent.extend(messages)
        replies = super().exchange(messages, timeout=timeout)
        if self.reply_hook is None:
            return replies
        return [self.reply_hook(m, r) for m, r in zip(messages, replies, strict=True)]

    def secure_weighted_mean(self, **request: Unpack[SecureRoundRequest]) -> SecureResult:
        """One real SecAgg+ round (Flower's workflow and client mod) over in-process nodes."""
        result = super().secure_weighted_mean(**request)
        self.secure_rounds.append(result)
        return result
