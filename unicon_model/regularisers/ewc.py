"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017).

The penalty is ``weight / 2 * sum_i F_i (theta_i - theta*_i)^2`` where ``F`` is the diagonal
of the empirical Fisher information of the earlier tasks' loss at ``theta*``, the model the
stage started from. ``F`` is the mean over examples of the squared per-example gradient.
Sites can pool their Fisher diagonals (:meth:`EWC.merge`, weighted by example counts), which
equals the Fisher of the pooled data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from unicon_model.regularisers.base import non_negative, trainable_parameters, unwrap

PerSampleLoss = Callable[[nn.Module, Mapping[str, Any]], Tensor]
"""``loss_fn(model, batch) -> (B,)`` per-example losses of the earlier tasks."""


def _sample(batch: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {
        k: v[index : index + 1] if isinstance(v, Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def _batch_size(batch: Mapping[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("batch holds no batched tensor")


class EWC:
    """Diagonal-Fisher EWC penalty over the trainable parameters.

    Parameters
    ----------
    weight
        Strength ``lambda`` of the penalty.
    """

    data_dependent = False

    def __init__(self, weight: float) -> None:
        self.weight = non_negative("EWC weight", weight)
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}
        self.count = 0

    def consolidate(
        self, model: nn.Module, batches: Iterable[Mapping[str, Any]], loss_fn: PerSampleLoss
    ) -> None:
        """Estimate the Fisher diagonal at the current parameters and anchor there.

        Parameters
        ----------
        model
            The model at ``theta*``; only parameters with ``requires_grad`` are covered.
        batches
            Batches of the site's data (dicts of tensors, batch dimension first).
        loss_fn
            Per-example losses of the earlier tasks, shape ``(B,)``.
        """
        module = unwrap(model)
        params = trainable_parameters(module)
        if not params:
            raise ValueError("EWC needs trainable parameters; set the stage's components first")
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        count = 0
        was_training = module.training
        module.eval()
        try:
            for batch in batches:
                for i in range(_batch_size(batch)):
                    module.zero_grad(set_to_none=True)
                    losses = loss_fn(module, _sample(batch, i))
                    losses.sum().backward()
                    for name, p in params.items():
                        if p.grad is not None:
                            fisher[name] += p.grad.detach().float() ** 2
                    count += 1
        finally:
            module.zero_grad(set_to_none=True)
            module.train(was_training)
        if count == 0:
            raise ValueError("EWC consolidation saw no examples")
        self.fisher = {n: f / count for n, f in fisher.items()}
        self.anchor = {n: p.detach().clone() for n, p in params.items()}
        self.count = count

    def penalty(self, model: nn.Module, batch: Mapping[str, Any], loss: Tensor) -> Tensor:
        """``weight / 2 * sum F (theta - theta*)^2``."""
        params = dict(unwrap(model).named_parameters())
        total = loss.new_zeros(())
        for name, fisher in self.fisher.items():
            p = params[name]
            delta = p - self.anchor[name].to(p.device)
            total = total + (fisher.to(p.device, p.dtype) * delta**2).sum()
        return 0.5 * self.weight * total

    def state_dict(self) -> dict[str, Tensor]:
        """``fisher.<name>``, ``anchor.<name>`` and ``count``."""
        state = {f"fisher.{n}": f for n, f in self.fisher.items()}
        state.update({f"anchor.{n}": a for n, a in self.anchor.items()})
        state["count"] = torch.tensor(self.count, dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
        fisher = {k.removeprefix("fisher."): v for k, v in state.items() if k.startswith("fisher.")}
        anchor = {k.removeprefix("anchor."): v for k, v in state.items() if k.startswith("anchor.")}
        if set(fisher) != set(anchor):
            raise ValueError(
                f"EWC state: Fisher and anchor cover different parameters "
                f"({sorted(set(fisher) ^ set(anchor))})"
            )
        self.fisher, self.anchor = fisher, anchor
        self.count = int(state["count"]) if "count" in state else 0

    @classmethod
    def from_state_dict(cls, weight: float, state: Mapping[str, Tensor]) -> EWC:
        """An EWC penalty restored from a stored state."""
        ewc = cls(weight)
        ewc.load_state_dict(state)
        return ewc

    @classmethod
    def merge(cls, parts: Sequence[EWC], weight: float | None = None) -> EWC:
        """Pool several sites' Fisher diagonals, weighted by their example counts.

        All parts must share the anchor (the same global model) and parameters.
        """
        if not parts:
            raise ValueError("nothing to merge")
        names = set(parts[0].fisher)
        for part in parts[1:]:
            if set(part.fisher) != names:
                raise ValueError("EWC parts cover different parameters")
        total = sum(p.count for p in parts)
        if total == 0:
            raise ValueError("EWC parts hold no examples")
        merged = cls(parts[0].weight if weight is None else weight)
        merged.fisher = {
            n: torch.stack([p.fisher[n] * (p.count / total) for p in parts]).sum(dim=0)
            for n in names
        }
        merged.anchor = {n: parts[0].anchor[n].clone() for n in names}
        merged.count = total
        return merged
