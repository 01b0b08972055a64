"""Box prompts of segmentation tasks: the box geometry, in one place.

A box is given per axis as inclusive voxel indices ``(lo, hi)``, so a ``(D, 2)`` integer
array (``boxes[a] = (lo_a, hi_a)``) or ``(B, D, 2)`` for a batch. The model sees a box as a
mask, 1 inside and 0 outside, shaped ``(B, 1, *spatial)`` (:func:`box_mask`); "no box" is the
whole image (all ones), which is also what a prompted head sees without a prompt.

- training: :func:`training_prompt` takes each sample's foreground bounding box
  (:func:`label_boxes`), moves each face by up to ``jitter`` of the box's size
  (:func:`jitter_boxes`) and replaces the box by the whole image with probability ``drop``;
- evaluation: :func:`label_prompt`, the label's bounding box without jitter;
- inference: :func:`parse_box`, :func:`check_box` and :func:`check_inside` read and check a
  user's box (a world box selects the voxels whose centres it holds, :func:`centres_in`), and
  :func:`voxel_region`, :func:`map_region` and :func:`region_voxels` carry it through the
  affines of the image and of the preprocessed patch (see :func:`client.inference.box_in_patch`).

Every random draw comes from the caller's generator (never the global RNG), and each call
draws the same number of values whatever the data, so seeded training repeats exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BoxError",
    "box_mask",
    "centres_in",
    "check_box",
    "check_inside",
    "jitter_boxes",
    "label_boxes",
    "label_prompt",
    "map_region",
    "parse_box",
    "region_voxels",
    "training_prompt",
    "voxel_region",
]

_TIE = 1e-6
"""Index distance within which a voxel centre counts as on a region's border."""

AXES = "xyz"
"""Axis names used in messages (axis 0 is ``x``)."""


class BoxError(ValueError):
    """A user's box cannot be used: malformed, empty, reversed or outside the image."""


def label_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """The foreground bounding box of each label map of a batch.

    Parameters
    ----------
    masks
        Integer label maps ``(B, *spatial)``; every label > 0 is foreground.

    Returns
    -------
    tuple of Tensor
        ``boxes`` ``(B, D, 2)`` (long, inclusive ``lo, hi`` per axis; ``0, 0`` where there
        is no foreground) and ``present`` ``(B,)`` (bool, whether the map has foreground).
    """
    foreground = masks > 0
    dims = foreground.ndim - 1
    boxes = []
    for axis in range(dims):
        others = tuple(a + 1 for a in range(dims) if a != axis)
        along = foreground.any(dim=others) if others else foreground  # (B, n_axis)
        size = along.shape[1]
        lo = along.int().argmax(dim=1)
        hi = size - 1 - along.flip(1).int().argmax(dim=1)
        boxes.append(torch.stack([lo, hi], dim=1))
    present = foreground.flatten(1).any(dim=1)
    stacked = torch.stack(boxes, dim=1).long()
    return torch.where(present[:, None, None], stacked, torch.zeros_like(stacked)), present


def jitter_boxes(
    boxes: Tensor, shape: Sequence[int], fraction: float, generator: torch.Generator
) -> Tensor:
    """Move each face of each box by a whole number of voxels, at most ``fraction`` of its size.

    Face ``(a, side)`` moves by an integer drawn uniformly from ``[-m, m]``, ``m =
    floor(fraction * (hi_a - lo_a + 1))``; the result is clipped to the image and ``hi`` is
    raised to ``lo`` where the faces crossed, so every box keeps at least one voxel and no
    face moves by more than ``m``.

    Parameters
    ----------
    boxes
        ``(B, D, 2)`` inclusive boxes.
    shape
        The image's spatial shape (``D`` sizes).
    fraction
        The plan's ``prompt_jitter`` (0 gives the boxes unchanged).
    generator
        The CPU generator of the draws (``B * D * 2`` uniform values).
    """
    draws = torch.rand(boxes.shape, generator=generator).to(boxes.device)
    size = (boxes[..., 1] - boxes[..., 0] + 1).unsqueeze(-1)
    limit = torch.floor(fraction * size.double()).long()
    offset = torch.minimum(torch.floor(draws * (2 * limit + 1)).long(), 2 * limit) - limit
    upper = torch.tensor(list(shape), device=boxes.device).long().view(1, -1, 1) - 1
    moved = torch.minimum(torch.clamp(boxes + offset, min=0), upper)
    lo = moved[..., 0]
    return torch.stack([lo, torch.maximum(moved[..., 1], lo)], dim=-1)


def box_mask(boxes: Tensor, present: Tensor, shape: Sequence[int]) -> Tensor:
    """The prompt of a batch of boxes: ``(B, 1, *shape)``, 1 inside each box, 0 outside.

    Samples whose ``present`` is false get the whole image (all ones).
    """
    batch, dims = boxes.shape[0], len(shape)
    mask = torch.ones((batch, *shape), dtype=torch.bool, device=boxes.device)
    for axis, size in enumerate(shape):
        index = torch.arange(size, device=boxes.device)
        inside = (index >= boxes[:, axis, :1]) & (index <= boxes[:, axis, 1:])  # (B, size)
        view = [batch] + [1] * dims
        view[axis + 1] = size
        mask = mask & inside.view(view)
    mask = mask | ~present.view([batch] + [1] * dims)
    return mask.unsqueeze(1).float()


def label_prompt(masks: Tensor, labelled: Tensor | None = None) -> Tensor:
    """Evaluation prompt: each label map's foreground bounding box, no jitter.

    Samples without foreground (or not ``labelled``) get the whole image.
    """
    boxes, present = label_boxes(masks)
    if labelled is not None:
        present = present & labelled.bool()
    return box_mask(boxes, present, masks.shape[1:])


def training_prompt(
    masks: Tensor,
    labelled: Tensor,
    *,
    jitter: float,
    drop: float,
    generator: torch.Generator,
) -> Tensor:
    """Training prompt: the label's bounding box, jittered, or with probability ``drop`` none.

    Parameters
    ----------
    masks
        Integer label maps ``(B, *spatial)``.
    labelled
        ``(B,)`` whether each sample is labelled for the task (others get the whole image).
    jitter, drop
        The task's ``prompt_jitter`` and ``prompt_drop``.
    generator
        The training generator; ``B * (2 D + 1)`` values are drawn whatever the data.

    Returns
    -------
    Tensor
        ``(B, 1, *spatial)`` float mask on the masks' device.
    """
    shape = masks.shape[1:]
    boxes, present = label_boxes(masks)
    boxes = jitter_boxes(boxes, shape, jitter, generator)
    kept = torch.rand(masks.shape[0], generator=generator).to(masks.device) >= drop
    return box_mask(boxes, present & labelled.bool() & kept, shape)


def parse_box(text: str, dims: int, *, shown: str | None = None) -> np.ndarray:
    """``x0,y0[,z0],x1,y1[,z1]`` as a ``(dims, 2)`` float array of ``(lo, hi)`` per axis.

    ``shown`` names the box in the error (default: ``text`` quoted).

    Raises
    ------
    BoxError
        If ``text`` does not hold ``2 * dims`` finite numbers.
    """
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 2 * dims or not all(np.isfinite(values)):
        corners = (
            ",".join(f"{a}0" for a in AXES[:dims]) + "," + ",".join(f"{a}1" for a in AXES[:dims])
        )
        raise BoxError(
            f"box {shown or repr(text)}: expected {2 * dims} finite numbers {corners} for a "
            f"{dims}D image"
        )
    return np.array(values, dtype=np.float64).reshape(2, dims).T


def _axis(axis: int) -> str:
    return AXES[axis] if axis < len(AXES) else str(axis)


def check_box(box: np.ndarray, shape: Sequence[int], *, shown: str, world: bool = False) -> None:
    """Refuse a box ``(D, 2)`` whose corners are reversed (or, in world space, equal).

    An inclusive voxel box with ``x0 == x1`` holds one slice of voxels; a world box with
    ``x0 == x1`` has no extent, so it is empty.

    Raises
    ------
    BoxError
        Naming ``shown`` (the box as the user wrote it), the axis and the image shape.
    """
    for axis, (lo, hi) in enumerate(box):
        name = _axis(axis)
        if lo > hi or (world and lo == hi):
            relation = ">" if lo > hi else "=="
            raise BoxError(
                f"box {shown}: {name}0 = {lo:g} {relation} {name}1 = {hi:g} on axis {axis} "
                f"({name}), so the box is empty; give the smaller corner first and a non-empty "
                f"extent (image shape {tuple(shape)})"
            )


def check_inside(region: np.ndarray, shape: Sequence[int], *, shown: str) -> None:
    """Refuse a continuous index region ``(D, 2)`` that is not inside the image's voxels.

    Raises
    ------
    BoxError
        Naming ``shown``, the first axis out of bounds (in voxel indices) and the shape.
    """
    for axis, ((lo, hi), size) in enumerate(zip(region, shape, strict=True)):
        if lo < -0.5 - _TIE or hi > size - 0.5 + _TIE:
            name = _axis(axis)
            raise BoxError(
                f"box {shown}: axis {axis} ({name}) spans voxels {lo + 0.5:g}..{hi - 0.5:g}, "
                f"outside the image's 0..{size - 1} (image shape {tuple(shape)})"
            )


def centres_in(region: np.ndarray, *, shown: str) -> np.ndarray:
    """The inclusive voxel box ``(D, 2)`` of the voxel centres in ``region``, borders included.

    How a world box selects an image's voxels: a box from 102.5 to 104.5 mm over 0.5 mm
    voxels centred at 100 + 0.5 i mm holds voxels 5..9.

    Raises
    ------
    BoxError
        If some axis holds no voxel centre (a box thinner than a voxel between two centres).
    """
    lo, hi = np.ceil(region[:, 0] - _TIE), np.floor(region[:, 1] + _TIE)
    if (lo > hi).any():
        axis = int(np.argmax(lo > hi))
        raise BoxError(
            f"box {shown} holds no voxel centre on axis {axis} ({_axis(axis)}): it spans voxel "
            f"indices {region[axis, 0]:g}..{region[axis, 1]:g}; widen it"
        )
    return np.stack([lo, hi], axis=1)


def voxel_region(box: np.ndarray) -> np.ndarray:
    """The continuous index region ``(D, 2)`` an inclusive voxel box covers (±0.5 voxel)."""
    return np.stack([box[:, 0] - 0.5, box[:, 1] + 0.5], axis=1)


def map_region(region: np.ndarray, affine_from: np.ndarray, affine_to: np.ndarray) -> np.ndarray:
    """A continuous region ``(D, 2)`` from one voxel grid's indices to another's.

    Each corner goes through ``affine_from`` (voxel to world) and the inverse of
    ``affine_to``; the result is the bounding region of the mapped corners.
    """
    dims = region.shape[0]
    corners = np.array(list(itertools.product(*region)), dtype=np.float64)  # (2^D, D)
    homogeneous = np.concatenate([corners, np.ones((len(corners), 1))], axis=1)
    mapped = (np.linalg.inv(affine_to) @ affine_from @ homogeneous.T).T[:, :dims]
    return np.stack([mapped.min(axis=0), mapped.max(axis=0)], axis=1)


def region_voxels(region: np.ndarray, shape: Sequence[int], *, shown: str) -> np.ndarray:
    """The inclusive voxel box ``(D, 2)`` of the voxels whose centres lie inside ``region``.

    A centre exactly on the region's border (a tie, as when 2 mm voxels become 1 mm) is left
    out, as MONAI's nearest-neighbour resampling of a box mask leaves it out. A region that
    holds no voxel centre keeps the voxel nearest its middle; the box is clipped to ``shape``.

    Raises
    ------
    BoxError
        If the region lies wholly outside ``shape`` (e.g. cropped away by preprocessing).
    """
    lo = np.floor(region[:, 0] + _TIE) + 1
    hi = np.ceil(region[:, 1] - _TIE) - 1
    thin = lo > hi
    centre = np.floor((region[:, 0] + region[:, 1]) / 2 + 0.5)
    lo, hi = np.where(thin, centre, lo), np.where(thin, centre, hi)
    upper = np.array(shape, dtype=np.float64) - 1
    outside = (hi < 0) | (lo > upper)
    if outside.any():
        axis = int(np.argmax(outside))
        raise BoxError(
            f"box {shown} lies outside the model's input patch {tuple(shape)} on axis {axis} "
            f"({_axis(axis)}) after preprocessing (the plan's "
            "spacing and patch size crop it away); give a box nearer the image centre"
        )
    return np.stack([np.clip(lo, 0, upper), np.clip(hi, 0, upper)], axis=1).astype(np.int64)
