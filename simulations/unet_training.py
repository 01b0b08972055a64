"""Training of the ``unet`` baseline's reference network (:mod:`simulations.unet_baseline`).

A MONAI :class:`~monai.networks.nets.BasicUNet` trained on pooled cases with DiceCE, Adam and
random flips along each spatial axis (MONAI ``RandFlipd`` on image and mask together), seeded;
with a validation split, the weights of the epoch with the best pooled validation Dice are
kept (checked every ``eval_every`` epochs). :func:`score` is the sites' metric function
(:func:`unicon_model.metrics.segmentation.mean_dice`) on the network's label maps.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import Compose, RandFlipd
from torch import Tensor, nn

from unicon_model.metrics.segmentation import mean_dice

logger = logging.getLogger(__name__)

UNET_EPOCHS = 60
"""Default epochs of the reference U-Net (DiceCE, Adam 1e-3, flips: converged on the
default scenario)."""


class UNetBaselineError(ValueError):
    """The U-Net baseline cannot run on this plan or these sites (the message says why)."""


@dataclass(frozen=True)
class UNetSettings:
    """Training settings of the reference U-Net.

    Attributes
    ----------
    epochs
        Passes over the pooled training cases.
    features
        ``BasicUNet`` channel widths (six numbers; small for CPU).
    lr
        Adam learning rate.
    batch_size
        Cases per step.
    flip_prob
        Probability of mirroring along each spatial axis (image and mask together).
    eval_every
        Epochs between checks of the pooled validation Dice (the best weights are kept).
    patience
        Stop after this many validation checks without a better Dice (``None``: never).
    norm_groups
        Groups of the GroupNorm layers (instance norm, BasicUNet's default, fails on the
        single-voxel bottleneck of 16³ patches); must divide every width.
    """

    epochs: int = UNET_EPOCHS
    features: tuple[int, int, int, int, int, int] = (8, 8, 16, 32, 64, 8)
    lr: float = 1e-3
    batch_size: int = 4
    flip_prob: float = 0.5
    eval_every: int = 5
    patience: int | None = 3
    norm_groups: int = 4


@dataclass
class Cases:
    """Images ``(N, C, *patch)`` and integer masks ``(N, *patch)`` of one split."""

    images: Tensor
    masks: Tensor
    sites: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _flips(spatial_dims: int, prob: float) -> Compose:
    return Compose(
        [
            RandFlipd(keys=["image", "mask"], prob=prob, spatial_axis=axis)
            for axis in range(spatial_dims)
        ]
    )


def _plain(value: Any) -> Tensor:
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def predict_labels(model: nn.Module, images: Tensor, *, batch_size: int = 8) -> Tensor:
    """Integer label maps ``(N, *patch)``: the argmax over the network's output channels."""
    model.eval()
    outputs: list[Tensor] = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            outputs.append(logits.argmax(dim=1))
    if not outputs:
        return torch.empty(0, dtype=torch.long)
    return torch.cat(outputs)


def score(model: nn.Module, cases: Cases, *, num_labels: int) -> float:
    """Foreground Dice of ``model`` on ``cases`` (the sites' metric function); NaN if none."""
    if len(cases) == 0:
        return math.nan
    return mean_dice(predict_labels(model, cases.images), cases.masks, num_labels=num_labels)


def _unet(spatial_dims: int, channels: int, num_labels: int, settings: UNetSettings) -> nn.Module:
    """A fresh ``BasicUNet`` (initialised from the global random state)."""
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=channels,
        out_channels=num_labels,
        features=settings.features,
        norm=("group", {"num_groups": settings.norm_groups}),
    )


def _epoch(
    model: nn.Module,
    train: Cases,
    order: Tensor,
    batch_size: int,
    flips: Compose,
    loss_fn: nn.Module,
    optimiser: torch.optim.Optimizer,
) -> list[float]:
    """One pass over ``train`` in ``order`` (flipped batches); the loss of every step."""
    model.train()
    losses: list[float] = []
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        pairs = [
            flips({"image": train.images[i], "mask": train.masks[i].unsqueeze(0)})
            for i in index.tolist()
        ]
        images = torch.stack([_plain(p["image"]) for p in pairs])
        masks = torch.stack([_plain(p["mask"]) for p in pairs])
        optimiser.zero_grad()
        loss = loss_fn(model(images), masks)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@dataclass
class _BestWeights:
    """The weights of the best validation Dice so far, and the checks since it improved."""

    patience: int | None
    dice: float = -math.inf
    state: dict[str, Tensor] | None = None
    stale: int = 0

    def stop_after(self, dice: float, model: nn.Module) -> bool:
        """Record a check of ``model`` at ``dice``; whether to stop (patience exhausted)."""
        if math.isfinite(dice) and (self.state is None or dice > self.dice):
            self.dice, self.state, self.stale = dice, copy.deepcopy(model.state_dict()), 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience


def train_unet(
    train: Cases,
    *,
    num_labels: int,
    spatial_dims: int,
    settings: UNetSettings = UNetSettings(),
    val: Cases | None = None,
    seed: int = 0,
) -> nn.Module:
    """Train a MONAI ``BasicUNet`` on ``train`` (DiceCE, Adam, flips), seeded.

    Parameters
    ----------
    train
        Training images ``(N, C, *patch)`` and masks ``(N, *patch)``.
    num_labels
        Output channels (labels including background).
    spatial_dims
        2 or 3.
    settings
        Epochs, widths, learning rate, batch size, flips, validation interval.
    val
        Validation cases; when given, the weights with the best validation Dice are returned.
    seed
        Seeds initialisation, shuffling and flips (the global random state is left as is).

    Raises
    ------
    UNetBaselineError
        If there are no training cases.
    """
    if len(train) == 0:
        raise UNetBaselineError("no training case has the route's images and a mask")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _unet(spatial_dims, int(train.images.shape[1]), num_labels, settings)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        flips = _flips(spatial_dims, settings.flip_prob)
        flips.set_random_state(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        best = _BestWeights(settings.patience)
        for epoch in range(1, settings.epochs + 1):
            order = torch.randperm(len(train), generator=generator)
            losses = _epoch(model, train, order, settings.batch_size, flips, loss_fn, optimiser)
            check = val is not None and len(val) > 0
            if check and (epoch % settings.eval_every == 0 or epoch == settings.epochs):
                assert val is not None
                dice = score(model, val, num_labels=num_labels)
                logger.info("unet epoch %d: loss %.4f, val Dice %.4f", epoch, np.mean(losses), dice)
                if best.stop_after(dice, model):
                    logger.info("unet: no better val Dice in %d check(s); stopping", best.stale)
                    break
        if best.state is not None:
            model.load_state_dict(best.state)
    model.eval()
    return model
