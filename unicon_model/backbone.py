"""The shared encoder: a MONAI residual encoder returning a feature pyramid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from monai.networks.blocks import ResidualUnit
from torch import Tensor, nn

from unicon_model.layers import ACTIVATION, NormKind, norm_argument
from unicon_model.lora import UNITS, ConvDelta, EncoderDeltas, merged_convolution


class Encoder(nn.Module):
    """Multi-scale residual encoder (2D or 3D).

    Level 0 keeps the input resolution; every further level halves it. Modality adapters
    supply the input stem and a residual adapter applied after each level, so the encoder
    itself is shared by every modality and task.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    widths
        Channels of each level; the stem must output ``widths[0]`` channels.
    norm
        ``group`` or ``instance``.
    """

    def __init__(self, spatial_dims: int, widths: Sequence[int], norm: NormKind) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.widths = tuple(widths)
        self.levels = nn.ModuleList()
        for i, width in enumerate(self.widths):
            in_channels = self.widths[max(i - 1, 0)]
            self.levels.append(
                ResidualUnit(
                    spatial_dims=spatial_dims,
                    in_channels=in_channels,
                    out_channels=width,
                    strides=1 if i == 0 else 2,
                    kernel_size=3,
                    subunits=2,
                    act=ACTIVATION,
                    norm=norm_argument(norm, width),
                )
            )

    @property
    def downsampling_factor(self) -> int:
        """How much the deepest level is smaller than the input in each dimension."""
        return int(2 ** (len(self.widths) - 1))

    def forward(
        self,
        stem_output: Tensor,
        adapters: Sequence[nn.Module],
        deltas: Sequence[EncoderDeltas] = (),
    ) -> list[Tensor]:
        """Run the levels, each followed by its adapter.

        Parameters
        ----------
        stem_output
            ``(B, widths[0], *spatial)`` from a modality stem.
        adapters
            One module per level (a modality's residual adapters).
        deltas
            The low-rank deltas of the route (its modality's and its task's). A level that
            none of them adapts runs exactly as without deltas (bit-identical output).

        Returns
        -------
        list of Tensor
            Features of every level, finest first.
        """
        features = []
        h = stem_output
        for i, (level, adapter) in enumerate(zip(self.levels, adapters, strict=True)):
            branches = [d for d in (owner.at(i) for owner in deltas) if d is not None]
            h = adapter(_adapted_level(level, h, branches) if branches else level(h))
            features.append(h)
        return features


def _adapted_level(level: nn.Module, x: Tensor, branches: Sequence[nn.ModuleDict]) -> Tensor:
    """``level(x)`` (a MONAI ``ResidualUnit``) with low-rank deltas on its main convolutions.

    Same operations as ``ResidualUnit.forward`` (``conv(x) + residual(x)``, each subunit
    ``adn(conv(x))``), with each delta added to its convolution: merged into its weight
    (one convolution), or as a parallel branch while a hook observes the delta's layers
    (Opacus' per-sample gradients need them to run).
    """
    residual = level.get_submodule("residual")(x)
    h = x
    for unit_name in UNITS:
        conv = cast(nn.Conv2d | nn.Conv3d, level.get_submodule(f"conv.{unit_name}.conv"))
        unit_deltas = [cast(ConvDelta, b[unit_name]) for b in branches if unit_name in b]
        if unit_deltas and not any(delta.observed for delta in unit_deltas):
            out = merged_convolution(conv, h, unit_deltas)
        else:
            out = conv(h)
            for delta in unit_deltas:
                out = out + delta(h)
        h = level.get_submodule(f"conv.{unit_name}.adn")(out)
    return cast(Tensor, h + residual)  # nn.Module calls are typed Any
