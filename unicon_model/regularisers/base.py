"""The interface every regulariser implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class Regulariser(Protocol):
    """A penalty added to the training loss.

    Attributes
    ----------
    data_dependent
        ``True`` when the penalty reads the batch (LwF): under DP-SGD its gradient must go
        through per-sample clipping and noise. ``False`` for parameter-space penalties (EWC,
        proximal anchor), whose gradient is added after the privatised step at no privacy
        cost.
    """

    data_dependent: bool

    def penalty(self, model: nn.Module, batch: Mapping[str, Any], loss: Tensor) -> Tensor:
        """The penalty for the current parameters (a scalar with a gradient)."""
        ...

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors that reproduce the regulariser (Fisher, anchors)."""
        ...

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        ...


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters with ``requires_grad`` (what a stage trains)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside an Opacus ``GradSampleModule`` (or ``model`` itself)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def non_negative(label: str, value: float) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``label`` when it is negative."""
    if value < 0:
        raise ValueError(f"{label} must be >= 0, got {value}")
    return float(value)
