"""Round strategies of the stage loop, and the choice of a stage's strategy.

See :mod:`server.rounds.base` for the interface and how to add a strategy.
"""

from __future__ import annotations

from server.rounds.analytic import AnalyticRound
from server.rounds.base import RoundContext, RoundHost, RoundStrategy
from server.rounds.fedavg import FedAvgRound
from server.rounds.secure import SecureAggregationRound
from unicon_model.schema import StageSpec

__all__ = [
    "STRATEGIES",
    "AnalyticRound",
    "FedAvgRound",
    "RoundContext",
    "RoundHost",
    "RoundStrategy",
    "SecureAggregationRound",
    "select_strategy",
]

STRATEGIES: tuple[type[RoundStrategy], ...] = (
    SecureAggregationRound,
    AnalyticRound,
    FedAvgRound,
)
"""Every round strategy, in the order :func:`select_strategy` asks them."""


def select_strategy(stage: StageSpec) -> RoundStrategy:
    """A new instance of the first strategy in :data:`STRATEGIES` that handles ``stage``.

    Raises
    ------
    ValueError
        If no strategy handles the stage (cannot happen with the built-in ones).
    """
    for strategy in STRATEGIES:
        if strategy.handles(stage):
            return strategy()
    raise ValueError(f"no round strategy handles stage {stage.name!r}")
