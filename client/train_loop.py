"""The optimiser steps of :func:`client.trainer.train`: one batch, and the local epochs.

:func:`run_epochs` loops over the (possibly Poisson, DP-wrapped) data loader and
:func:`train_step` takes one optimiser step on one batch: the objective and the
data-dependent regularisers under autocast, then the parameter-space regularisers (EWC,
FedProx), whose gradient is added after DP clipping and noise. :class:`StepContext` holds
what every step uses; :func:`client.trainer.train` builds it, and takes the trained
components' tensors with :func:`final_update`. No Flower here.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from client.data import label_key
from client.errors import TrainingError
from client.losses import objective
from unicon_model.components import select_state
from unicon_model.prompts import training_prompt
from unicon_model.regularisers import Regulariser
from unicon_model.schema import TaskSpec

logger = logging.getLogger(__name__)

__all__ = [
    "StepContext",
    "autocast",
    "box_prompts",
    "final_update",
    "run_epochs",
    "to_device",
    "train_step",
]


def to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``batch`` with every tensor moved to ``device`` (non-blocking)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Mixed precision on CUDA when ``enabled`` (bfloat16 where supported, else float16)."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class StepContext:
    """What every optimiser step of one local training uses.

    Attributes
    ----------
    model
        The model being trained (its parameters are shared with ``net``).
    net
        ``model``, or its Opacus wrapper under DP-SGD.
    optimizer
        The stage's optimiser, or its DP wrapper under DP-SGD.
    scaler
        The gradient scaler (enabled only for float16 autocast).
    tasks
        The stage's objective tasks (name -> spec).
    regularisers
        Continual-learning penalties added to the loss.
    private
        Whether training is DP-SGD.
    modality
        The modality of the site's training data.
    device
        Where the batches go.
    use_amp
        Whether to run the forward pass under autocast.
    batch_size
        The batch size (the loss normaliser under DP-SGD).
    generator
        The training generator (batching, DP noise), from which the box prompts of
        prompted segmentation tasks draw their jitter and drop (:func:`box_prompts`).
    """

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tasks: Mapping[str, TaskSpec]
    regularisers: Sequence[Regulariser]
    private: bool
    modality: str
    device: torch.device
    use_amp: bool
    batch_size: int
    generator: torch.Generator | None = None


def box_prompts(
    batch: Mapping[str, Tensor], tasks: Mapping[str, TaskSpec], generator: torch.Generator
) -> dict[str, Tensor]:
    """The training box prompt of each prompted task, keyed ``<task>:prompt``.

    Each sample's box is its label's foreground bounding box, each face moved by up to the
    task's ``prompt_jitter`` of the box's size, or the whole image with probability
    ``prompt_drop`` (and for a sample without foreground or label); see
    :func:`unicon_model.prompts.training_prompt`. The prompt is an input of the model, not a
    parameter, so DP-SGD clips and noises the gradients as for any input.
    """
    return {
        label_key(task.name, "prompt"): training_prompt(
            batch[label_key(task.name, "mask")],
            batch[label_key(task.name, "has")],
            jitter=task.prompt_jitter,
            drop=task.prompt_drop,
            generator=generator,
        )
        for task in tasks.values()
        if task.prompted
    }


def _penalty(
    regularisers: Sequence[Regulariser],
    module: nn.Module,
    batch_view: Mapping[str, Any],
    loss: Tensor,
    *,
    data_dependent: bool,
) -> Tensor:
    """Sum of the penalties of the data-dependent (or the parameter-space) regularisers."""
    return sum(
        (
            r.penalty(module, batch_view, loss)
            for r in regularisers
            if bool(getattr(r, "data_dependent", False)) == data_dependent
        ),
        start=loss.new_zeros(()),
    )


def _optimiser_step(ctx: StepContext, param_penalty: Tensor) -> None:
    """Add the parameter-space penalty's gradient and step (after DP clipping and noise)."""
    if ctx.private:
        if ctx.optimizer.pre_step():  # type: ignore[attr-defined]
            if param_penalty.requires_grad:
                param_penalty.backward()
            ctx.optimizer.original_optimizer.step()  # type: ignore[attr-defined]
    else:
        if param_penalty.requires_grad:
            ctx.scaler.scale(param_penalty).backward()
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()


def train_step(
    ctx: StepContext, raw: Mapping[str, Tensor]
) -> tuple[float, dict[str, float]] | None:
    """One optimiser step on the batch ``raw``.

    Returns
    -------
    tuple or None
        The batch's loss (objective plus data-dependent penalties) and per-task losses;
        ``None`` for an empty Poisson batch (gradients cleared, nothing else done).
    """
    if raw["image"].shape[0] == 0:
        ctx.optimizer.zero_grad(set_to_none=True)
        return None
    batch = to_device(raw, ctx.device)
    if ctx.generator is not None:
        batch.update(box_prompts(batch, ctx.tasks, ctx.generator))
    ctx.optimizer.zero_grad(set_to_none=True)
    with autocast(ctx.device, ctx.use_amp):
        normaliser = ctx.batch_size if ctx.private else None
        loss, parts = objective(
            ctx.net, batch, ctx.tasks, modality=ctx.modality, normaliser=normaliser
        )
        batch_view = {**batch, "modality": ctx.modality}
        data_penalty = _penalty(ctx.regularisers, ctx.net, batch_view, loss, data_dependent=True)
    ctx.scaler.scale(loss + data_penalty).backward()
    # Parameter-space penalties (EWC, FedProx) depend on no data: their gradient is
    # added after DP clipping and noise, at no privacy cost.
    param_penalty = _penalty(ctx.regularisers, ctx.model, batch_view, loss, data_dependent=False)
    _optimiser_step(ctx, param_penalty)
    return float(loss.detach()) + float(data_penalty.detach()), parts


def run_epochs(
    ctx: StepContext, loader: Iterable[Mapping[str, Tensor]], epochs: int
) -> tuple[list[float], dict[str, list[float]], int]:
    """Train for ``epochs`` passes over ``loader``.

    Returns
    -------
    tuple
        Mean loss of each epoch (``nan`` for an epoch of empty batches only), every batch's
        loss of each task, and the optimiser steps taken (an empty Poisson batch counts).
    """
    epoch_losses: list[float] = []
    task_losses: dict[str, list[float]] = {t: [] for t in ctx.tasks}
    steps = 0
    for _epoch in range(epochs):
        losses: list[float] = []
        for raw in loader:
            result = train_step(ctx, raw)
            steps += 1  # an empty Poisson batch still counts as a step
            if result is None:
                continue
            loss, parts = result
            losses.append(loss)
            for name, value in parts.items():
                task_losses[name].append(value)
        epoch_losses.append(float(np.mean(losses)) if losses else math.nan)
    return epoch_losses, task_losses, steps


def final_update(ctx: StepContext, components: Sequence[str]) -> dict[str, Tensor]:
    """The trained components' tensors (CPU copies); :class:`TrainingError` on NaN/Inf.

    Removes Opacus' hooks from the model first (under DP-SGD) and clears its gradients.
    """
    if ctx.private:
        ctx.net.to_standard_module()  # type: ignore[operator]  # remove Opacus' hooks from model
    ctx.model.zero_grad(set_to_none=True)
    update = {k: v.detach().cpu().clone() for k, v in select_state(ctx.model, components).items()}
    bad = [k for k, v in update.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise TrainingError(
            f"training produced NaN/Inf in {len(bad)} tensor(s) (e.g. {bad[:3]}); the update is "
            "not sent. Lower the learning rate or check the data."
        )
    return update
