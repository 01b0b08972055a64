"""Layer settings shared by the backbone, the adapters and the heads.

All normalisation is GroupNorm or InstanceNorm (never BatchNorm) and activations are
non-inplace LeakyReLU, so every configuration passes Opacus' strict module validation and
per-sample gradients can be computed for DP-SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

NormKind = Literal["group", "instance"]

ACTIVATION: tuple[str, dict[str, Any]] = ("leakyrelu", {"negative_slope": 0.01, "inplace": False})
"""MONAI activation argument used by every block."""


def norm_argument(kind: NormKind, channels: int) -> tuple[str, dict[str, Any]]:
    """MONAI ``norm`` argument for ``channels`` channels.

    Parameters
    ----------
    kind
        ``group`` (the largest of 8, 4, 2, 1 groups dividing ``channels``) or ``instance``
        (affine, no running statistics).
    channels
        Channels of the normalised tensor.
    """
    if kind == "instance":
        return ("instance", {"affine": True, "track_running_stats": False})
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return ("group", {"num_groups": groups})


def pooled_size(widths: Sequence[int]) -> int:
    """Length of :func:`global_pool`'s output for an encoder of ``widths``."""
    return 2 * sum(widths)


def global_pool(features: list[Tensor]) -> Tensor:
    """Global average and global max of every feature level: ``(B, 2 * sum(widths))``.

    The max keeps small findings visible: a lesion of a few hundred voxels barely moves the
    average of a whole volume but dominates the maximum of the channels that respond to it.
    """
    pooled = []
    for level in features:
        flat = level.flatten(2)
        pooled += [flat.mean(dim=2), flat.amax(dim=2)]
    return torch.cat(pooled, dim=1)


def conv1x1(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Conv2d | nn.Conv3d:
    """A 1x1(x1) convolution with bias."""
    if spatial_dims == 3:
        return nn.Conv3d(in_channels, out_channels, kernel_size=1)
    return nn.Conv2d(in_channels, out_channels, kernel_size=1)
