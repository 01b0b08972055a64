"""How the coordinator talks to sites, independent of Flower.

The stage driver sends :class:`Outgoing` messages and receives :class:`Incoming` replies
through a :class:`Transport`. The ServerApp implements it over Flower's ``Grid``
(:mod:`server.server_app`); tests and baselines can implement it in-process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, Unpack

from torch import Tensor

from unicon_model.schema import SecureAggregationSpec

if TYPE_CHECKING:
    from server.secure_aggregation import SecureResult


@dataclass(frozen=True)
class Outgoing:
    """A request to one node."""

    node_id: int
    message_type: str
    config: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Incoming:
    """A node's reply (or its error)."""

    node_id: int
    arrays: dict[str, Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    error_code: int | None = None
    error_reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether the node answered without error."""
        return self.error_code is None


class SecureRoundRequest(TypedDict):
    """What one SecAgg+ round is asked: the arguments of :meth:`Transport.secure_weighted_mean`.

    A ``TypedDict``, so every transport takes them as typed keywords (``**request``) and a
    caller passes one request (``transport.secure_weighted_mean(**request)``).

    Attributes
    ----------
    nodes
        Nodes to ask (at least 2; at least ``spec.num_shares`` to tolerate dropouts).
    config
        The request config every node receives (the stage request).
    arrays
        Tensors every node receives (the components it needs).
    reply_shapes
        Names and shapes of the arrays each node returns, in the order they are sent.
    spec
        SecAgg+ settings of the stage.
    max_weight
        Upper bound on any node's ``num_examples`` (weights are divided by it).
    server_round
        Round number (SecAgg+ uses it as the message group id).
    """

    nodes: Sequence[int]
    config: Mapping[str, Any]
    arrays: Mapping[str, Tensor]
    reply_shapes: Mapping[str, Sequence[int]]
    spec: SecureAggregationSpec
    max_weight: float
    server_round: int


class Transport(Protocol):
    """Message exchange with the connected sites."""

    def node_ids(self) -> list[int]:
        """Ids of the nodes connected now."""
        ...

    def exchange(self, messages: Sequence[Outgoing], *, timeout: float) -> list[Incoming]:
        """Send ``messages`` and return one reply per message (errors for missing ones)."""
        ...

    def secure_weighted_mean(self, **request: Unpack[SecureRoundRequest]) -> SecureResult:
        """One SecAgg+ round: the example-weighted mean of the nodes' vectors, nothing else."""
        ...


def tensor_bytes(arrays: dict[str, Tensor]) -> int:
    """Bytes of the tensors' values (what a message carries, without framing)."""
    return sum(t.numel() * t.element_size() for t in arrays.values())
