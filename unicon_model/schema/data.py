"""``[data]``: how sites turn images into tensors (patch, spacing, CT window, augmentation)."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from unicon_model.schema.base import MAX_PATCH_EDGE, MAX_PATCH_VOXELS, _Frozen


class AugmentationSpec(_Frozen):
    """Random augmentation of the training cases (MONAI dictionary transforms).

    Applied at each site, on the fly, to the *training* samples only: every time a case is
    drawn into a local training batch it gets a fresh random transform. Evaluation (val, test,
    and any evaluation of the train split), analytic statistics, EWC's Fisher information and
    inference never see augmented data. The randomness follows the local training's seed: a
    seeded run is reproducible, and a DP-SGD run (whose seed is a secret drawn from
    ``os.urandom`` at the site) augments unpredictably to the coordinator too.

    Spatial transforms move the image channels and every segmentation mask of the case
    together (masks with nearest-neighbour interpolation, so they keep integer labels);
    intensity transforms change the image only. Classification and survival labels and the
    clinical covariates pass through unchanged. The images are already normalised to about
    [0, 1] (see :class:`DataSpec`), so intensity amounts are in those units.

    Everything is off by default: an option's amount is used only when its probability is
    above 0. The transforms run in this order: flips, affine, intensity scale, intensity
    shift, noise.

    Attributes
    ----------
    flip_prob
        Probability of mirroring the case along each spatial axis, drawn independently per
        axis (``RandFlipd``). In [0, 1]; default 0 (off).
    affine_prob
        Probability of one random rotation plus scaling of the case (``RandAffined``, zero
        padding, image bilinear, masks nearest). In [0, 1]; default 0 (off).
    rotate_deg
        Largest rotation angle in degrees: the angle about each axis (the in-plane angle in
        2D) is uniform in ``[-rotate_deg, rotate_deg]``. In [0, 180]; default 10.
    scale_range
        Largest relative zoom of the affine: the factor along each axis is uniform in
        ``[1 - scale_range, 1 + scale_range]``. In [0, 0.5]; default 0.1.
    intensity_prob
        Probability of each of the intensity scale and the intensity shift, drawn
        independently (``RandScaleIntensityd``, ``RandShiftIntensityd``). In [0, 1]; default
        0 (off).
    intensity_scale
        Largest relative change of the image intensities: they are multiplied by
        ``1 + f`` with ``f`` uniform in ``[-intensity_scale, intensity_scale]``. In [0, 0.5];
        default 0.1.
    intensity_shift
        Largest offset added to the image intensities, uniform in
        ``[-intensity_shift, intensity_shift]``. In [0, 0.5]; default 0.1.
    noise_prob
        Probability of adding Gaussian noise to the image (``RandGaussianNoised``). In
        [0, 1]; default 0 (off).
    noise_std
        Standard deviation of that noise. In [0, 0.5]; default 0.05.
    """

    flip_prob: float = Field(default=0.0, ge=0, le=1)
    affine_prob: float = Field(default=0.0, ge=0, le=1)
    rotate_deg: float = Field(default=10.0, ge=0, le=180)
    scale_range: float = Field(default=0.1, ge=0, le=0.5)
    intensity_prob: float = Field(default=0.0, ge=0, le=1)
    intensity_scale: float = Field(default=0.1, ge=0, le=0.5)
    intensity_shift: float = Field(default=0.1, ge=0, le=0.5)
    noise_prob: float = Field(default=0.0, ge=0, le=1)
    noise_std: float = Field(default=0.05, ge=0, le=0.5)

    @property
    def enabled(self) -> bool:
        """Whether any transform can change a sample (a probability and its amount > 0)."""
        return (
            self.flip_prob > 0
            or (self.affine_prob > 0 and (self.rotate_deg > 0 or self.scale_range > 0))
            or (self.intensity_prob > 0 and (self.intensity_scale > 0 or self.intensity_shift > 0))
            or (self.noise_prob > 0 and self.noise_std > 0)
        )


DEFAULT_CT_WINDOW: tuple[float, float] = (-160.0, 240.0)
"""Hounsfield window mapped to [0, 1] unless the plan sets one (abdominal soft tissue, level 40
width 400); the one place this default is written."""


class DataSpec(_Frozen):
    """How sites turn their images into tensors for this plan.

    Attributes
    ----------
    patch_size
        Spatial size every case is cropped/padded to (length = ``spatial_dims``); each entry
        in 1..:data:`MAX_PATCH_EDGE`, at most :data:`MAX_PATCH_VOXELS` voxels in all.
    spacing
        Voxel spacing (mm, each > 0) images are resampled to; ``None`` keeps the native
        spacing.
    ct_window
        Hounsfield window ``(low, high)`` mapped to [0, 1] for CT inputs. The default is the
        abdominal soft-tissue window (level 40, width 400) used to read liver lesions; a lung
        task would declare ``[-1000, 400]``.
    augmentation
        Random augmentation of the training cases (``[data.augmentation]``); off by default.
        See :class:`AugmentationSpec`.
    """

    patch_size: tuple[Annotated[int, Field(ge=1, le=MAX_PATCH_EDGE)], ...] = (32, 32, 32)
    spacing: tuple[Annotated[float, Field(gt=0)], ...] | None = None
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    augmentation: AugmentationSpec = AugmentationSpec()

    @field_validator("patch_size")
    @classmethod
    def _patch_not_too_large(cls, patch: tuple[int, ...]) -> tuple[int, ...]:
        voxels = math.prod(patch)
        if voxels > MAX_PATCH_VOXELS:
            raise ValueError(
                f"{list(patch)} is {voxels} voxels, more than the maximum {MAX_PATCH_VOXELS} "
                f"(256³); use a smaller patch, e.g. {[min(p, 256) for p in patch]}"
            )
        return patch

    @model_validator(mode="after")
    def _window_is_increasing(self) -> DataSpec:
        low, high = self.ct_window
        if not low < high:
            raise ValueError(
                f"ct_window must be [low, high] with low < high, got {list(self.ct_window)}"
            )
        return self
