"""Proximal anchor: ``mu / 2 * ||theta - theta_0||^2`` (FedProx, L2-SP)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from unicon_model.regularisers.base import non_negative, trainable_parameters, unwrap


class ProximalAnchor:
    """Pull the trained parameters towards an anchor (the round's global model).

    Parameters
    ----------
    mu
        Strength; the gradient of the penalty is ``mu * (theta - theta_0)``.
    """

    data_dependent = False

    def __init__(self, mu: float) -> None:
        self.mu = non_negative("mu", mu)
        self.anchor: dict[str, Tensor] = {}

    def set_anchor(self, model: nn.Module) -> None:
        """Anchor at the current values of ``model``'s trainable parameters."""
        self.anchor = {
            name: p.detach().clone() for name, p in trainable_parameters(unwrap(model)).items()
        }

    def penalty(self, model: nn.Module, batch: Mapping[str, Any], loss: Tensor) -> Tensor:
        """``mu / 2 * sum ||theta - theta_0||^2`` over the anchored parameters."""
        params = dict(unwrap(model).named_parameters())
        total = loss.new_zeros(())
        for name, anchor in self.anchor.items():
            p = params[name]
            total = total + ((p - anchor.to(p.device)) ** 2).sum()
        return 0.5 * self.mu * total

    def state_dict(self) -> dict[str, Tensor]:
        """The anchor tensors."""
        return dict(self.anchor)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore the anchor."""
        self.anchor = {k: v.detach().clone() for k, v in state.items()}
