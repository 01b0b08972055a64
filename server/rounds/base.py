"""The interface of a round strategy: how one round of a stage updates the global model.

The coordinator (:mod:`server.coordinator`) runs the stage loop: it selects the sites, grows
the model, and for each round asks the stage's strategy to run the round, then validates,
checkpoints, evaluates and commits. A strategy runs one round (in the spirit of Flower's
``Strategy``): it sends the selected sites the request, checks their replies, aggregates
them and loads the result into the global model. It gets a :class:`RoundContext` (the
coordinator as :class:`RoundHost`, the stage index, the round, the global model and the
selected nodes) and returns the round's record, a dict written to the run's metrics:

``sites``
    The sites whose replies were aggregated.
``num_examples``
    Their total examples (the aggregation weight).
``rejected``, ``failed``
    Site -> why its reply was refused, and site -> why it sent none.
``loss``, ``site_loss``
    The example-weighted training loss and each site's (training stages).

and whatever else the strategy records (``secure``, ``clipped``, ``skipped``). The
coordinator adds the validation, timing and round fields. A strategy raises
:class:`server.errors.StageError` when the round has nothing trustworthy to aggregate; the
coordinator checks the global model is finite after every round, so a strategy loads only
finite tensors (:func:`server.round_checks.require_finite` first).

Strategies: :class:`~server.rounds.fedavg.FedAvgRound` (plain FedAvg of the trained
components), :class:`~server.rounds.analytic.AnalyticRound` (summed ridge statistics, solved
once) and :class:`~server.rounds.secure.SecureAggregationRound` (either through SecAgg+).
:func:`server.rounds.select_strategy` picks the first in :data:`server.rounds.STRATEGIES`
whose :meth:`RoundStrategy.handles` accepts the stage.

Adding a strategy
-----------------
A new strategy, say FedAdam server momentum, is one new module ``server/rounds/fedadam.py``
holding a subclass of :class:`RoundStrategy`:

- ``name``: a short label (``"fedadam"``);
- ``handles(stage)``: whether it runs ``stage`` (e.g. a plan option of the stage);
- ``run(context)``: the round, like :class:`~server.rounds.fedavg.FedAvgRound` (request,
  send, reply checks, then the server optimiser step in place of the weighted average).
  State across the stage's rounds (the moments) lives on the instance: the coordinator
  makes one instance per stage run (a resume starts a fresh one).

Then list the class in :data:`server.rounds.STRATEGIES` ahead of the strategies it takes
over from (the list is the one place that orders them); the coordinator does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from server.sites import SiteLedger
    from server.timing import PhaseClock
    from server.transport import Incoming, Transport
    from unicon_model import protocol
    from unicon_model.model import UniconModel
    from unicon_model.schema import Plan, StageSpec


class RoundHost(Protocol):
    """What a strategy uses of the coordinator (:class:`server.coordinator.Coordinator`)."""

    plan: Plan
    """The validated plan."""
    sites: dict[int, SiteLedger]
    """Node id -> what the coordinator knows of its site (bytes and ε are counted here)."""
    transport: Transport
    """Message exchange with the sites (SecAgg+ included)."""
    clock: PhaseClock
    """Where the round's time goes (phases ``train_wait``, ``update_check``, ...)."""

    def request(
        self, index: int, round_: int, model: UniconModel, split: str = "train"
    ) -> tuple[protocol.StageRequest, dict[str, dict[str, Tensor]]]:
        """The stage request of ``round_`` and the model's components to send with it."""
        ...

    def send(
        self,
        message_type: str,
        nodes: list[int],
        request: protocol.StageRequest,
        components: Mapping[str, Mapping[str, Tensor]],
        timeout: float,
    ) -> tuple[list[Incoming], dict[int, str]]:
        """Send a request; every reply, and node id -> why its reply is malformed."""
        ...


@dataclass(frozen=True)
class RoundContext:
    """What one round gets from the coordinator.

    Attributes
    ----------
    host
        The coordinator: plan, sites, transport, clock, request and send.
    index
        The stage's index in the plan.
    round
        The round (1-based; analytic stages run round 1 only).
    model
        The global model, grown by the stage; the strategy loads the round's result into it.
    nodes
        The node ids selected for the stage.
    """

    host: RoundHost
    index: int
    round: int
    model: UniconModel
    nodes: list[int]

    @property
    def stage(self) -> StageSpec:
        """The stage's spec."""
        return self.host.plan.stages[self.index]

    def site(self, node: int) -> str:
        """The site name of ``node``."""
        return self.host.sites[node].site


class RoundStrategy(ABC):
    """How one round of a stage aggregates the selected sites' replies (see the module)."""

    name: ClassVar[str]
    """Short label of the strategy (logs)."""

    @classmethod
    @abstractmethod
    def handles(cls, stage: StageSpec) -> bool:
        """Whether this strategy runs the rounds of ``stage``."""

    @abstractmethod
    def run(self, context: RoundContext) -> dict[str, Any]:
        """Run one round, load its result into ``context.model`` and return its record."""
