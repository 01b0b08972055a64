"""MONAI dictionary transforms that turn a case's images into a training patch.

Per image key: CT is windowed in Hounsfield units and scaled to [0, 1]; PET is read as SUV
and scaled from [0, ``SUV_MAX``] to [0, 1]; any other modality is percentile-normalised.
Then every image and mask is resampled to the plan's spacing (masks with nearest
neighbour) and centre-cropped or padded to the plan's patch size.

:func:`augmentation` builds the random transforms of the plan's ``[data.augmentation]``,
applied after the cache to training samples only (see :class:`client.data.Augmenter`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from monai.transforms import (
    Compose,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from unicon_model.schema import AugmentationSpec
from unicon_model.schema.data import DEFAULT_CT_WINDOW

__all__ = ["DEFAULT_CT_WINDOW", "SUV_MAX", "augmentation", "intensity_kind", "preprocessing"]

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


def _intensity_transform(key: str, ct_window: Sequence[float]) -> Callable[..., Any]:
    """The intensity normalisation of one image key (see :func:`intensity_kind`)."""
    kind = intensity_kind(key)
    if kind == "ct":
        return ScaleIntensityRanged(
            keys=key,
            a_min=float(ct_window[0]),
            a_max=float(ct_window[1]),
            b_min=0.0,
            b_max=1.0,
            clip=True,
        )
    if kind == "pet":
        return ScaleIntensityRanged(
            keys=key, a_min=0.0, a_max=SUV_MAX, b_min=0.0, b_max=1.0, clip=True
        )
    return ScaleIntensityRangePercentilesd(
        keys=key,
        lower=1,
        upper=99,
        b_min=0.0,
        b_max=1.0,
        clip=True,
        channel_wise=True,
    )


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
    transforms: list[Callable[..., Any]] = [
        _intensity_transform(key, ct_window) for key in image_keys
    ]
    keys = [*image_keys, *mask_keys]
    if spacing is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(mask_keys)
        transforms.append(Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes))
    transforms.append(ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(patch_size)))
    return Compose(transforms)


def _intensity_augmentation(spec: AugmentationSpec, image_key: str) -> list[Callable[..., Any]]:
    """The random intensity scale, intensity shift and noise of the image (in that order)."""
    transforms: list[Callable[..., Any]] = []
    if spec.intensity_prob > 0 and spec.intensity_scale > 0:
        transforms.append(
            RandScaleIntensityd(
                keys=image_key, factors=spec.intensity_scale, prob=spec.intensity_prob
            )
        )
    if spec.intensity_prob > 0 and spec.intensity_shift > 0:
        transforms.append(
            RandShiftIntensityd(
                keys=image_key, offsets=spec.intensity_shift, prob=spec.intensity_prob
            )
        )
    if spec.noise_prob > 0 and spec.noise_std > 0:
        transforms.append(
            RandGaussianNoised(
                keys=image_key, prob=spec.noise_prob, std=spec.noise_std, sample_std=False
            )
        )
    return transforms


def augmentation(
    spec: AugmentationSpec,
    *,
    spatial_dims: int,
    image_key: str = "image",
    mask_keys: Sequence[str] = (),
) -> Compose:
    """Random augmentation of one training sample, as set by the plan.

    Parameters
    ----------
    spec
        The plan's ``data.augmentation``; a transform whose probability (or amount) is 0 is
        left out.
    spatial_dims
        2 or 3.
    image_key
        Key of the ``(C, *spatial)`` float image.
    mask_keys
        Keys of ``(1, *spatial)`` float label maps: flipped and warped with the image,
        nearest-neighbour, and never intensity-transformed.

    Returns
    -------
    Compose
        Flips, affine, intensity scale, intensity shift, noise (in that order). Seed it with
        ``set_random_state`` before each call for reproducible draws.
    """
    spatial = [image_key, *mask_keys]
    transforms: list[Callable[..., Any]] = []
    if spec.flip_prob > 0:
        transforms += [
            RandFlipd(keys=spatial, prob=spec.flip_prob, spatial_axis=axis)
            for axis in range(spatial_dims)
        ]
    if spec.affine_prob > 0 and (spec.rotate_deg > 0 or spec.scale_range > 0):
        angle = math.radians(spec.rotate_deg)
        transforms.append(
            RandAffined(
                keys=spatial,
                prob=spec.affine_prob,
                rotate_range=(angle,) * (3 if spatial_dims == 3 else 1),
                scale_range=(spec.scale_range,) * spatial_dims,
                mode=["bilinear"] + ["nearest"] * len(mask_keys),
                padding_mode="zeros",
            )
        )
    transforms += _intensity_augmentation(spec, image_key)
    return Compose(transforms)
