"""MONAI dictionary transforms that turn a case's images into a training patch.

Per image key: CT is windowed in Hounsfield units and scaled to [0, 1]; PET is read as SUV
and scaled from [0, ``SUV_MAX``] to [0, 1]; any other modality is percentile-normalised.
Then every image and mask is resampled to the plan's spacing (masks with nearest
neighbour) and centre-cropped or padded to the plan's patch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from monai.transforms import (
    Compose,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

DEFAULT_CT_WINDOW = (-160.0, 240.0)
"""Hounsfield window mapped to [0, 1] unless the plan sets one (abdominal soft tissue)."""

SUV_MAX = 10.0
"""PET standardised uptake value mapped to 1."""

IntensityKind = Literal["ct", "pet", "generic"]


def intensity_kind(image_key: str) -> IntensityKind:
    """Normalisation used for an image key (``ct``, ``pet``, anything else generic)."""
    if image_key == "ct":
        return "ct"
    if image_key == "pet":
        return "pet"
    return "generic"


def preprocessing(
    image_keys: Sequence[str],
    *,
    mask_keys: Sequence[str] = (),
    patch_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
) -> Compose:
    """Deterministic preprocessing of one case (the part that is cached).

    Parameters
    ----------
    image_keys
        Keys of the images (``ct``, ``pet``, ...), each ``(C, *spatial)`` MetaTensor.
    mask_keys
        Keys of integer label maps, resampled with nearest-neighbour interpolation.
    patch_size
        Output spatial size.
    spacing
        Target voxel spacing in mm, or ``None`` to keep the native grid.
    ct_window
        Hounsfield units ``(low, high)`` mapped to [0, 1] (clipped) for CT.
    """
    transforms: list[Callable[..., Any]] = []
    for key in image_keys:
        kind = intensity_kind(key)
        if kind == "ct":
            transforms.append(
                ScaleIntensityRanged(
                    keys=key,
                    a_min=float(ct_window[0]),
                    a_max=float(ct_window[1]),
                    b_min=0.0,
                    b_max=1.0,
                    clip=True,
                )
            )
        elif kind == "pet":
            transforms.append(
                ScaleIntensityRanged(
                    keys=key, a_min=0.0, a_max=SUV_MAX, b_min=0.0, b_max=1.0, clip=True
                )
            )
        else:
            transforms.append(
                ScaleIntensityRangePercentilesd(
                    keys=key,
                    lower=1,
                    upper=99,
                    b_min=0.0,
                    b_max=1.0,
                    clip=True,
                    channel_wise=True,
                )
            )
    keys = [*image_keys, *mask_keys]
    if spacing is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(mask_keys)
        transforms.append(Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes))
    transforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(patch_size)))
    return Compose(transforms)
