"""Masked-volume reconstruction: the self-supervised objective of a foundation stage.

Each sample hides a fixed fraction (``mask_ratio``) of the cubic blocks of ``mask_size``
voxels that tile its patch, in its first ``channels`` input channels (set to 0, the bottom
of the preprocessed intensity range); the model routes the masked input through the modality
stem, the encoder and the task's light decoder, and the loss is the mean squared error on the
hidden voxels only (as in masked autoencoders, He et al. 2022, and their convolutional
variants, SparK, Tian et al. 2023). No label is read, so every case with the route's images
trains the encoder.

Training draws the hidden blocks from torch's global generator, which the local training
seeds (from ``os.urandom`` under DP-SGD, so the coordinator cannot reproduce them either).
Evaluation hides blocks drawn from a fixed seed per sample position, so a validation score is
comparable from round to round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from unicon_model.schema import TaskSpec

EVALUATION_SEED = 20_251_202
"""Seed of the hidden blocks at evaluation (offset by each batch's first index)."""

PEAK = 1.0
"""Intensity range of the preprocessed images (CT windowed and PET scaled to about [0, 1]),
the peak of the reported PSNR."""


def block_mask(
    batch: int,
    spatial: Sequence[int],
    *,
    ratio: float,
    size: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Which voxels are hidden: exactly ``round(ratio * blocks)`` (at least 1) per sample.

    Parameters
    ----------
    batch
        Number of samples.
    spatial
        Patch size; every entry must be a multiple of ``size``.
    ratio
        Fraction of the blocks to hide, in (0, 1).
    size
        Block edge in voxels.
    generator
        Random source (``None``: torch's global generator).

    Returns
    -------
    Tensor
        Boolean ``(batch, 1, *spatial)`` on the CPU, ``True`` where hidden.

    Raises
    ------
    ValueError
        If ``size`` does not divide every spatial size.
    """
    if any(s % size for s in spatial):
        raise ValueError(
            f"mask_size {size} does not divide the patch size {list(spatial)}; use a divisor "
            "of every data.patch_size entry"
        )
    grid = [s // size for s in spatial]
    blocks = math.prod(grid)
    hidden = min(blocks, max(1, round(ratio * blocks)))
    scores = torch.rand(batch, blocks, generator=generator)
    chosen = scores.argsort(dim=1)[:, :hidden]
    mask = torch.zeros(batch, blocks, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    mask = mask.view(batch, 1, *grid)
    for axis in range(2, 2 + len(grid)):
        mask = mask.repeat_interleave(size, dim=axis)
    return mask


def task_mask(image: Tensor, task: TaskSpec, *, generator: torch.Generator | None = None) -> Tensor:
    """The hidden voxels of a batch for ``task`` (see :func:`block_mask`), on its device."""
    mask = block_mask(
        image.shape[0],
        image.shape[2:],
        ratio=task.mask_ratio,
        size=task.mask_size,
        generator=generator,
    )
    return mask.to(image.device)


def masked_errors(
    model: nn.Module, image: Tensor, task: TaskSpec, *, modality: str, mask: Tensor
) -> Tensor:
    """Per-sample mean squared error of the reconstruction on the hidden voxels ``(B,)``.

    Parameters
    ----------
    model
        Called as ``model(masked, modality=..., task=...)``.
    image
        ``(B, C, *spatial)``; its first ``task.channels`` channels are hidden where ``mask``
        is set (to 0) and predicted, the others are passed as they are.
    mask
        Boolean ``(B, 1, *spatial)``, ``True`` where hidden.
    """
    channels = task.channels
    if image.shape[1] < channels:
        raise ValueError(
            f"task {task.name!r} reconstructs {channels} channel(s), but modality "
            f"{modality!r} has {image.shape[1]} input(s)"
        )
    target = image[:, :channels]
    masked = torch.cat([target.masked_fill(mask, 0.0), image[:, channels:]], dim=1)
    output = model(masked, modality=modality, task=task.name).float()
    squared = (output - target.float()) ** 2 * mask
    hidden = mask.flatten(1).sum(1).clamp(min=1) * channels
    return cast(Tensor, squared.flatten(1).sum(1) / hidden)  # model(...) is typed Any


def reconstruction_per_sample(
    model: nn.Module, batch: Mapping[str, Tensor], task: TaskSpec, *, modality: str
) -> tuple[Tensor, Tensor]:
    """Training loss of a reconstruction task: ``(losses (B,), counted (B,))``.

    Every sample counts (no label is needed); the hidden blocks come from torch's global
    generator.
    """
    image = batch["image"]
    losses = masked_errors(model, image, task, modality=modality, mask=task_mask(image, task))
    counted = torch.ones_like(losses, dtype=torch.bool)
    return losses, counted


@torch.no_grad()
def reconstruction_metrics(
    model: nn.Module,
    dataset: Dataset[dict[str, Tensor]],
    task: TaskSpec,
    *,
    modality: str,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, float]:
    """``<task>/n``, ``<task>/mse`` and ``<task>/psnr`` of the reconstruction on ``dataset``.

    ``mse`` is the mean over cases of each case's error on its hidden voxels; ``psnr`` is
    ``10 log10(PEAK² / mse)`` (higher is better). The hidden blocks of the sample at position
    ``i`` of a batch starting at ``start`` come from a generator seeded with
    ``EVALUATION_SEED + start``, so the same dataset is scored the same way every time.
    """
    model.to(device).eval()
    errors: list[Tensor] = []
    loader: DataLoader[dict[str, Tensor]] = DataLoader(dataset, batch_size=batch_size)
    start = 0
    for raw in loader:
        generator = torch.Generator().manual_seed(EVALUATION_SEED + start)
        image = raw["image"].to(device)
        mask = task_mask(image, task, generator=generator)
        errors.append(masked_errors(model, image, task, modality=modality, mask=mask).cpu())
        start += image.shape[0]
    if not errors:
        return {}
    mse = float(torch.cat(errors).double().mean())
    psnr = 10.0 * math.log10(PEAK**2 / mse) if mse > 0 else math.inf
    name = task.name
    return {f"{name}/n": float(start), f"{name}/mse": mse, f"{name}/psnr": psnr}
