"""The shared encoder: a MONAI residual encoder returning a feature pyramid."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.blocks import ResidualUnit
from torch import Tensor, nn

from unicon_model.layers import ACTIVATION, NormKind, norm_argument


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

    def forward(self, stem_output: Tensor, adapters: Sequence[nn.Module]) -> list[Tensor]:
        """Run the levels, each followed by its adapter.

        Parameters
        ----------
        stem_output
            ``(B, widths[0], *spatial)`` from a modality stem.
        adapters
            One module per level (a modality's residual adapters).

        Returns
        -------
        list of Tensor
            Features of every level, finest first.
        """
        features = []
        h = stem_output
        for level, adapter in zip(self.levels, adapters, strict=True):
            h = adapter(level(h))
            features.append(h)
        return features
