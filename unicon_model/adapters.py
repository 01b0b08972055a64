"""Modality adapters: an input stem plus zero-initialised residual adapters (PEMMA-style)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from unicon_model.layers import ACTIVATION, NormKind, conv1x1, norm_argument


class ResidualAdapter(nn.Module):
    """Low-rank residual bottleneck ``x + up(act(down(x)))`` with ``up`` zero-initialised.

    At initialisation the adapter is the identity, so adding it changes no output.
    """

    def __init__(self, spatial_dims: int, channels: int, rank: int) -> None:
        super().__init__()
        self.down = conv1x1(spatial_dims, channels, rank)
        self.act = nn.LeakyReLU(negative_slope=0.01)
        self.up = conv1x1(spatial_dims, rank, channels)
        with torch.no_grad():
            self.up.weight.zero_()
            if self.up.bias is not None:
                self.up.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Return ``x`` plus the adapter's low-rank correction."""
        return cast(Tensor, x + self.up(self.act(self.down(x))))  # nn.Module calls are typed Any


class ModalityAdapter(nn.Module):
    """Everything specific to one imaging modality.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Number of stacked input images (e.g. 2 for CT+PET).
    widths
        Encoder widths: the stem outputs ``widths[0]``; one adapter per level.
    rank
        Bottleneck channels of each residual adapter.
    norm
        ``group`` or ``instance``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        widths: Sequence[int],
        *,
        rank: int,
        norm: NormKind,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = Convolution(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=widths[0],
            kernel_size=3,
            act=ACTIVATION,
            norm=norm_argument(norm, widths[0]),
        )
        self.adapters = nn.ModuleList(ResidualAdapter(spatial_dims, w, rank) for w in widths)

    @torch.no_grad()
    def initialise_from(self, source: ModalityAdapter, channel_map: Sequence[int | None]) -> None:
        """Copy ``source``'s weights so this path starts equal to the source path.

        Parameters
        ----------
        source
            The adapter of an existing modality.
        channel_map
            For each input channel of this adapter, the source input channel it copies, or
            ``None`` for a new input, whose stem weights are zeroed.

        Notes
        -----
        Encoder deltas (``lora.``) and decoder deltas (``decoder_lora.``) are copied where
        both adapters have them with the same shape (same level or task, and rank); the
        others keep their own initial values (``B = 0``),
        so with the same LoRA levels and rank the new route starts equal to the source's.
        """
        own = self.state_dict()
        for key, value in source.state_dict().items():
            if key.startswith(("lora.", "decoder_lora.")) and (
                key not in own or tuple(own[key].shape) != tuple(value.shape)
            ):
                continue
            if key == "stem.conv.weight":
                weight = torch.zeros_like(own[key])
                for target, src in enumerate(channel_map):
                    if src is not None:
                        weight[:, target] = value[:, src]
                own[key] = weight
            else:
                own[key] = value.clone()
        self.load_state_dict(own)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the input stem."""
        return cast(Tensor, self.stem(x))  # nn.Module calls are typed Any
