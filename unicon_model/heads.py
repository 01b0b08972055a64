"""Task heads over the encoder's feature pyramid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F  # noqa: N812
from monai.networks.blocks import Convolution
from torch import Tensor, nn

from unicon_model.layers import (
    ACTIVATION,
    NormKind,
    conv1x1,
    global_pool,
    norm_argument,
    pooled_size,
)
from unicon_model.lora import DecoderDeltas


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.LeakyReLU(negative_slope=0.01),
        nn.Linear(hidden, out_features),
    )


class ClassificationHead(nn.Module):
    """Softmax classifier on the globally pooled multi-scale features.

    Parameters
    ----------
    widths
        Encoder widths (the pooled feature has ``pooled_size(widths)`` values).
    out_channels
        Number of classes.
    hidden
        Hidden width of the two-layer MLP.
    """

    def __init__(self, widths: Sequence[int], out_channels: int, *, hidden: int) -> None:
        super().__init__()
        self.mlp = _mlp(pooled_size(widths), hidden, out_channels)

    def forward(self, features: list[Tensor], clinical: Tensor | None = None) -> Tensor:
        """Return class logits ``(B, out_channels)``."""
        return cast(Tensor, self.mlp(global_pool(features)))  # nn.Module calls are typed Any


class SurvivalHead(nn.Module):
    """Cox proportional-hazards risk score: an image term plus a linear covariate term.

    ``risk = mlp(pooled image features) + covariates @ beta``. The clinical covariates enter
    linearly, as in a Cox model (each weight of ``beta`` is a log hazard ratio per unit of
    the plan's scaled covariate), and ``beta`` starts at zero. So when the images carry no
    signal the image term is a near-constant offset, which the partial likelihood ignores,
    and the head is exactly a Cox model on the covariates, which it can fit as well as a
    dedicated Cox regression. The covariates are scaled by the plan's ``covariate_scaling``
    before they reach the head.

    Parameters
    ----------
    widths
        Encoder widths.
    num_covariates
        Number of numeric clinical covariates (0 for image only).
    hidden
        Hidden width of the image MLP.
    """

    def __init__(self, widths: Sequence[int], num_covariates: int, *, hidden: int) -> None:
        super().__init__()
        self.num_covariates = num_covariates
        self.mlp = _mlp(pooled_size(widths), hidden, 1)
        self.covariates: nn.Linear | None = None
        if num_covariates:
            self.covariates = nn.Linear(num_covariates, 1, bias=False)
            nn.init.zeros_(self.covariates.weight)

    def forward(self, features: list[Tensor], clinical: Tensor | None = None) -> Tensor:
        """Return the risk score ``(B,)``; higher means shorter expected survival."""
        pooled = global_pool(features)
        risk = self.mlp(pooled).squeeze(1)
        if self.covariates is not None:
            if clinical is None or clinical.shape != (pooled.shape[0], self.num_covariates):
                got = None if clinical is None else tuple(clinical.shape)
                raise ValueError(
                    f"the survival head needs clinical covariates of shape "
                    f"({pooled.shape[0]}, {self.num_covariates}), got {got}"
                )
            risk = risk + self.covariates(clinical.to(pooled.dtype)).squeeze(1)
        return cast(Tensor, risk)  # nn.Module calls are typed Any


class SegmentationHead(nn.Module):
    """U-Net style decoder over the feature pyramid.

    From the deepest level up: upsample (no parameters), concatenate the skip features,
    convolve. The output has the input's resolution.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    widths
        Encoder widths.
    out_channels
        Number of labels including background.
    norm
        ``group`` or ``instance``.
    foreground_prior
        Expected fraction of foreground voxels (all labels after background together): the
        output bias starts at background 0 and each label at ``log(p / (K (1 - p)))``, so the
        initial softmax gives the data's class odds.
    prompted
        Whether the head takes a box prompt (:mod:`unicon_model.prompts`): a ``(B, 1,
        *spatial)`` mask, 1 inside the box, resized (area) to each block's resolution and
        concatenated to the block's input, so every block's convolution has one more input
        channel. Without a prompt a prompted head sees the whole image (all ones).
    decoder_width
        ``0`` (default): each block has the encoder level's width, as in a U-Net. ``c > 0``:
        a light decoder; every level is first projected to ``c`` channels (a 1×1
        convolution each) and every block has ``c`` channels, so the head's size (and what
        a site uploads for it) no longer grows with the encoder's widths.
    """

    def __init__(
        self,
        spatial_dims: int,
        widths: Sequence[int],
        out_channels: int,
        *,
        norm: NormKind,
        foreground_prior: float = 0.01,
        prompted: bool = False,
        decoder_width: int = 0,
    ) -> None:
        super().__init__()
        self.prompted = prompted
        self.lateral: nn.ModuleList | None = None
        if decoder_width:
            self.lateral = nn.ModuleList(conv1x1(spatial_dims, w, decoder_width) for w in widths)
            widths = [decoder_width] * len(widths)
        self.blocks = nn.ModuleList()
        for i in range(len(widths) - 1, 0, -1):
            self.blocks.append(
                Convolution(
                    spatial_dims=spatial_dims,
                    in_channels=widths[i] + widths[i - 1] + int(prompted),
                    out_channels=widths[i - 1],
                    kernel_size=3,
                    act=ACTIVATION,
                    norm=norm_argument(norm, widths[i - 1]),
                )
            )
        self.out = conv1x1(spatial_dims, widths[0], out_channels)
        if not 0 < foreground_prior < 1:
            raise ValueError(f"foreground_prior must be in (0, 1), got {foreground_prior}")
        if self.out.bias is not None and out_channels > 1:
            labels = out_channels - 1
            with torch.no_grad():
                self.out.bias.zero_()
                self.out.bias[1:] = math.log(foreground_prior / (labels * (1 - foreground_prior)))

    def adaptable_convolutions(self) -> list[nn.Conv2d | nn.Conv3d]:
        """The decoder's convolutions in forward order: each block's, then the output's."""
        convs: list[nn.Conv2d | nn.Conv3d] = []
        for block in self.blocks:
            conv = block.get_submodule("conv")
            assert isinstance(conv, nn.Conv2d | nn.Conv3d)
            convs.append(conv)
        assert isinstance(self.out, nn.Conv2d | nn.Conv3d)
        return [*convs, self.out]

    def _prompt_at(self, prompt: Tensor | None, skip: Tensor) -> list[Tensor]:
        """The prompt channel at ``skip``'s resolution (empty for an unprompted head)."""
        if not self.prompted:
            return []
        if prompt is None:
            return [skip.new_ones((skip.shape[0], 1, *skip.shape[2:]))]
        return [F.interpolate(prompt.to(skip.dtype), size=skip.shape[2:], mode="area")]

    def _check_prompt(self, prompt: Tensor | None, features: list[Tensor]) -> None:
        if prompt is None:
            return
        if not self.prompted:
            raise ValueError(
                "this segmentation head takes no prompt (its task has prompt = 'none')"
            )
        batch, dims = features[0].shape[0], features[0].ndim - 2
        if prompt.ndim != dims + 2 or prompt.shape[:2] != (batch, 1):
            raise ValueError(
                f"a box prompt must have shape ({batch}, 1, {', '.join(['size'] * dims)}), "
                f"got {tuple(prompt.shape)}"
            )

    def forward(
        self,
        features: list[Tensor],
        clinical: Tensor | None = None,
        deltas: DecoderDeltas | None = None,
        prompt: Tensor | None = None,
    ) -> Tensor:
        """Return per-voxel logits ``(B, out_channels, *spatial)``.

        ``deltas`` (a modality's, see :class:`unicon_model.lora.DecoderDeltas`) add their
        low-rank branch to every convolution; without them the output is exactly the
        decoder's own. ``prompt``: the box mask ``(B, 1, *spatial)`` of a prompted head
        (``None``: the whole image); refused by an unprompted head.
        """
        self._check_prompt(prompt, features)
        if self.lateral is not None:
            features = [lateral(f) for lateral, f in zip(self.lateral, features, strict=True)]
        h = features[-1]
        for i, (block, skip) in enumerate(zip(self.blocks, reversed(features[:-1]), strict=True)):
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            x = torch.cat([h, skip, *self._prompt_at(prompt, skip)], dim=1)
            if deltas is None:
                h = block(x)
            else:
                h = block.get_submodule("adn")(block.get_submodule("conv")(x) + deltas[i](x))
        # nn.Module calls are typed Any
        if deltas is None:
            return cast(Tensor, self.out(h))
        return cast(Tensor, self.out(h) + deltas[len(self.blocks)](h))


class ReconstructionHead(nn.Module):
    """Light decoder of a self-supervised reconstruction task.

    Every level of the pyramid is projected to ``widths[0]`` channels (1×1 convolution),
    upsampled to the finest level (linear interpolation, no parameters) and summed; one 3×3
    convolution and a 1×1 output convolution follow. With so little capacity of its own, the
    decoder leaves the work of filling in hidden blocks to the encoder, as in masked
    autoencoders (He et al. 2022), so the encoder's features are what the stage improves.

    Parameters
    ----------
    spatial_dims, widths, norm
        As in :class:`SegmentationHead`.
    out_channels
        Channels to reconstruct.
    """

    def __init__(
        self, spatial_dims: int, widths: Sequence[int], out_channels: int, *, norm: NormKind
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv1x1(spatial_dims, w, widths[0]) for w in widths)
        self.fuse = Convolution(
            spatial_dims=spatial_dims,
            in_channels=widths[0],
            out_channels=widths[0],
            kernel_size=3,
            act=ACTIVATION,
            norm=norm_argument(norm, widths[0]),
        )
        self.out = conv1x1(spatial_dims, widths[0], out_channels)
        self.mode = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, features: list[Tensor], clinical: Tensor | None = None) -> Tensor:
        """Return the reconstructed channels ``(B, out_channels, *spatial)``."""
        size = features[0].shape[2:]
        total = self.lateral[0](features[0])
        for lateral, feature in zip(self.lateral[1:], features[1:], strict=True):
            projected = lateral(feature)
            total = total + F.interpolate(projected, size=size, mode=self.mode, align_corners=False)
        return cast(Tensor, self.out(self.fuse(total)))  # nn.Module calls are typed Any
