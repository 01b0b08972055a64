"""Low-rank deltas of the shared encoder's convolutions, owned by a task or a modality.

A delta of a convolution with weight ``W`` (``out, in, *kernel``) is ``ΔW = B·A`` with
``A`` of shape ``(rank, in·prod(kernel))`` and ``B`` of shape ``(out, rank)``. It runs as a
parallel branch of two real convolutions, ``up(down(x))``: ``down`` has the original
kernel, stride, padding and dilation and ``rank`` output channels (``A``), ``up`` is a 1x1
convolution without bias (``B``), zero-initialised so that a new delta changes nothing until
it is trained. Composing the two is exactly the convolution with ``B·A``, and both are
ordinary ``nn.Conv2d``/``nn.Conv3d`` layers, so Opacus computes their per-sample gradients
for DP-SGD (a functional weight merge would get none).

Outside DP-SGD the encoder runs the cheaper, equivalent form instead: one convolution with
the merged weight ``W + Σ B·A`` (:func:`merged_convolution`), which saves the branch's own
full-resolution convolution forward and backward. It does so only while nothing observes
the branch's layers (:attr:`ConvDelta.observed`): Opacus' ``GradSampleModule`` hooks them
to capture activations, and then the branch runs as two real convolutions.

The deltas of a task live inside the task's module (``tasks.<t>.lora.``) and those of a
modality inside its adapter (``modalities.<m>.lora.``), so they belong to that component:
they train, travel, aggregate, cache, checkpoint and export with it. The encoder applies
them only on the routes ``task@modality`` of their owner; every other route runs the frozen
encoder exactly as before (see :meth:`unicon_model.backbone.Encoder.forward`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

UNITS: tuple[str, ...] = ("unit0", "unit1")
"""Names of the main convolutions of an encoder level (MONAI ``ResidualUnit`` subunits)."""

_Conv = nn.Conv2d | nn.Conv3d
_Levels = nn.ModuleList | Sequence[nn.Module]


def level_convolutions(level: nn.Module) -> dict[str, _Conv]:
    """The main convolutions of one encoder level, by subunit name.

    Parameters
    ----------
    level
        A MONAI ``ResidualUnit`` of :class:`unicon_model.backbone.Encoder`.

    Returns
    -------
    dict
        ``{"unit0": conv, "unit1": conv}``.
    """
    convs: dict[str, _Conv] = {}
    for unit in UNITS:
        conv = level.get_submodule(f"conv.{unit}.conv")
        if not isinstance(conv, nn.Conv2d | nn.Conv3d):
            raise TypeError(f"encoder level subunit {unit} is {type(conv).__name__}, not a conv")
        convs[unit] = conv
    return convs


def level_channels(widths: Sequence[int], level: int) -> int:
    """Largest rank a delta of encoder ``level`` may have: ``min(in, out)`` of its convs."""
    return min(widths[max(level - 1, 0)], widths[level])


class ConvDelta(nn.Module):
    """The low-rank branch ``up(down(x))`` = convolution of ``x`` with ``B·A``.

    Parameters
    ----------
    conv
        The frozen convolution the delta adapts (its kernel, stride, padding and dilation
        are copied; it is not stored).
    rank
        Rank of the delta, at most ``min(in_channels, out_channels)`` of ``conv``.
    """

    def __init__(self, conv: _Conv, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(conv.in_channels, conv.out_channels):
            raise ValueError(
                f"LoRA rank {rank} must be in 1..{min(conv.in_channels, conv.out_channels)} "
                f"for a convolution with {conv.in_channels} -> {conv.out_channels} channels"
            )
        cls = type(conv)
        self.down = cls(
            conv.in_channels,
            rank,
            kernel_size=conv.kernel_size,  # type: ignore[arg-type]
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=False,
        )
        self.up = cls(rank, conv.out_channels, kernel_size=1, bias=False)
        with torch.no_grad():
            self.up.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """The delta's contribution to the adapted convolution's output."""
        return cast(Tensor, self.up(self.down(x)))  # nn.Module calls are typed Any

    @property
    def observed(self) -> bool:
        """Whether a forward or backward hook watches the branch's layers (e.g. Opacus').

        Hooked layers must run as themselves, so the encoder then runs the branch instead of
        merging it into the frozen convolution's weight.
        """
        return any(
            layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
            for layer in (self.down, self.up)
        )

    def weight(self) -> Tensor:
        """``ΔW = B·A`` with the adapted convolution's weight shape (merging, checks, export)."""
        a = self.down.weight.flatten(1)  # (rank, in * prod(kernel))
        b = self.up.weight.flatten(1)  # (out, rank)
        return (b @ a).reshape(b.shape[0], *self.down.weight.shape[1:])


def merged_convolution(conv: _Conv, x: Tensor, deltas: Sequence[ConvDelta]) -> Tensor:
    """``conv(x) + Σ delta(x)`` as one convolution with the weight ``W + Σ B·A``.

    Equal to the branch form up to floating-point rounding (same function, same gradients
    with respect to ``A`` and ``B``), at the cost of the frozen convolution alone plus the
    tiny ``B·A`` products. Not for layers Opacus hooks (see :attr:`ConvDelta.observed`).

    Parameters
    ----------
    conv
        The frozen convolution (its bias, stride, padding, dilation and padding mode apply).
    x
        The convolution's input.
    deltas
        The deltas of ``conv`` on this route (a modality's and a task's may both apply).

    Returns
    -------
    Tensor
        The adapted convolution's output.
    """
    weight = conv.weight
    for delta in deltas:
        weight = weight + delta.weight()
    return cast(Tensor, conv._conv_forward(x, weight, conv.bias))  # typed Any in torch


class EncoderDeltas(nn.Module):
    """The deltas one component (a task or a modality) adds to the encoder.

    Parameters
    ----------
    levels
        The encoder's levels (``Encoder.levels``); only their shapes are read.
    rank
        Rank of every delta.
    at
        Encoder levels to adapt; each gets a delta on both main convolutions.

    Notes
    -----
    State-dict keys are ``levels.<level>.<unit>.{down,up}.weight``.
    """

    def __init__(self, levels: _Levels, rank: int, at: Sequence[int]) -> None:
        super().__init__()
        self.rank = rank
        missing = [i for i in at if not 0 <= i < len(levels)]
        if missing:
            raise ValueError(f"LoRA levels {missing} do not exist (levels 0..{len(levels) - 1})")
        self.levels = nn.ModuleDict()
        for i in sorted(set(at)):
            convs = level_convolutions(levels[i])
            self.levels[str(i)] = nn.ModuleDict(
                {unit: ConvDelta(conv, rank) for unit, conv in convs.items()}
            )

    def at(self, level: int) -> nn.ModuleDict | None:
        """The deltas of ``level`` by subunit name, or ``None`` if it has none."""
        key = str(level)
        if key not in self.levels:
            return None
        deltas = self.levels[key]
        assert isinstance(deltas, nn.ModuleDict)
        return deltas


def deltas_of(module: nn.Module) -> EncoderDeltas | None:
    """The encoder deltas a task head or modality adapter owns, if any."""
    deltas = getattr(module, "lora", None)
    return deltas if isinstance(deltas, EncoderDeltas) else None


def attach(owner: nn.Module, levels: _Levels, rank: int, at: Sequence[int] | None) -> None:
    """Give ``owner`` (a task head or modality adapter) encoder deltas as its ``lora`` child.

    Parameters
    ----------
    owner
        The component's module; its state dict gains ``lora.levels...`` keys.
    levels
        The encoder's levels.
    rank
        Rank of the deltas (``0``: nothing is attached).
    at
        Levels to adapt; ``None`` or empty: all of them.
    """
    if rank <= 0:
        return
    chosen = list(at) if at else list(range(len(levels)))
    owner.add_module("lora", EncoderDeltas(levels, rank, chosen))


class DecoderDeltas(nn.Module):
    """Low-rank deltas of a segmentation decoder's convolutions, owned by a modality.

    Parameters
    ----------
    convs
        The decoder's convolutions in forward order
        (:meth:`unicon_model.heads.SegmentationHead.adaptable_convolutions`); only their
        shapes are read.
    rank
        Rank of every delta, clamped to each convolution's ``min(in, out)`` channels.

    Notes
    -----
    State-dict keys are ``deltas.<i>.{down,up}.weight``; ``B = 0`` at first, so the route
    starts exactly on the decoder's own output.
    """

    def __init__(self, convs: Sequence[_Conv], rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"decoder LoRA rank must be >= 1, got {rank}")
        self.deltas = nn.ModuleList(
            ConvDelta(conv, min(rank, conv.in_channels, conv.out_channels)) for conv in convs
        )

    def __getitem__(self, index: int) -> ConvDelta:
        delta = self.deltas[index]
        assert isinstance(delta, ConvDelta)
        return delta

    def __len__(self) -> int:
        return len(self.deltas)
