"""Dice score per label for integer label maps, computed with MONAI.

Empty labels
------------
MONAI's ``ignore_empty=True`` behaviour is used: for a batch item whose *target* lacks a label,
the Dice of that label is ``nan`` for that item (whatever the prediction holds, so false
positives in images without the label are not penalised), and it is left out of the batch mean.
A label absent from the target in every batch item therefore gets ``nan``, and
:func:`mean_dice` leaves it out of the mean over labels. In particular a label absent from both
prediction and target is ``nan`` (not 1).
"""

from __future__ import annotations

import logging

import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["dice", "dice_per_case", "mean_dice", "mean_dice_of_cases"]


def _as_channel_labels(labels: Tensor, name: str, num_labels: int) -> Tensor:
    """Return ``labels`` shaped ``(B, 1, n_voxels)``, checking dtype and value range."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(
            f"{name} must be an integer label map, got dtype {labels.dtype}: "
            "take argmax over the class channel first"
        )
    if labels.ndim < 2 or labels.numel() == 0:
        raise ValueError(
            f"{name} must be a non-empty map of shape (B, *spatial) or (B, 1, *spatial), "
            f"got {tuple(labels.shape)}"
        )
    # Dice sums over voxels, so the spatial layout does not matter: (B, *spatial) and
    # (B, 1, *spatial) both become (B, 1, n_voxels) with the same scores.
    channel = labels.reshape(labels.shape[0], 1, -1)
    if int(channel.min()) < 0 or int(channel.max()) >= num_labels:
        raise ValueError(
            f"{name} holds labels in {int(channel.min())}..{int(channel.max())} but num_labels="
            f"{num_labels} allows only 0..{num_labels - 1}: raise num_labels or fix the map"
        )
    return channel.long()


def dice(
    pred: Tensor, target: Tensor, *, num_labels: int, include_background: bool = False
) -> Tensor:
    """Dice score of each label, averaged over the batch.

    The label maps are one-hot encoded and scored with :func:`monai.metrics.compute_dice`
    (``ignore_empty=True``, see the module docstring for empty labels).

    Parameters
    ----------
    pred
        Predicted integer label map, shape ``(B, *spatial)`` or ``(B, 1, *spatial)``.
    target
        Reference integer label map, same shape as ``pred``.
    num_labels
        Number of labels including background (label 0); values must lie in
        ``0..num_labels-1``.
    include_background
        Whether to score label 0 too.

    Returns
    -------
    Tensor
        Float tensor of shape ``(num_labels,)`` (or ``(num_labels - 1,)`` without background):
        the mean over batch items of each label's Dice, ignoring items where the label is absent
        from the target; ``nan`` for a label absent from the target in every item.

    Raises
    ------
    ValueError
        If shapes differ, maps are not integer, values are out of range or ``num_labels`` is
        too small.
    """
    per_item = dice_per_case(
        pred, target, num_labels=num_labels, include_background=include_background
    )
    return torch.nanmean(per_item.float(), dim=0)


def dice_per_case(
    pred: Tensor, target: Tensor, *, num_labels: int, include_background: bool = False
) -> Tensor:
    """Dice score of each batch item and label (the per-case scores behind :func:`dice`).

    Parameters
    ----------
    pred, target, num_labels, include_background
        As in :func:`dice`.

    Returns
    -------
    Tensor
        Float tensor of shape ``(B, num_labels)`` (or ``(B, num_labels - 1)`` without
        background); ``nan`` where the item's target lacks the label.
    """
    minimum = 1 if include_background else 2
    if num_labels < minimum:
        raise ValueError(
            f"num_labels must be >= {minimum} (include_background={include_background}), "
            f"got {num_labels}"
        )
    if pred.shape != target.shape:
        raise ValueError(
            f"pred has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}: "
            "they must match"
        )
    pred_onehot = one_hot(_as_channel_labels(pred, "pred", num_labels), num_classes=num_labels)
    target_onehot = one_hot(
        _as_channel_labels(target, "target", num_labels), num_classes=num_labels
    )
    return compute_dice(
        pred_onehot, target_onehot, include_background=include_background, ignore_empty=True
    ).float()


def mean_dice(
    pred: Tensor, target: Tensor, *, num_labels: int, include_background: bool = False
) -> float:
    """Mean over labels of :func:`dice`, ignoring labels whose Dice is ``nan``.

    Parameters
    ----------
    pred, target, num_labels, include_background
        As in :func:`dice`, whose per-label scores this averages.

    Returns
    -------
    float
        The nan-mean of the per-label Dice; ``nan`` if no scored label occurs in the target.
    """
    return mean_dice_of_cases(
        dice_per_case(pred, target, num_labels=num_labels, include_background=include_background)
    )


def mean_dice_of_cases(per_case: Tensor) -> float:
    """:func:`mean_dice` from the per-case scores of :func:`dice_per_case`.

    Parameters
    ----------
    per_case
        Dice of each case and label, shape ``(B, labels)``, ``nan`` where the target lacks
        the label.

    Returns
    -------
    float
        Per label the nan-mean over cases, then the nan-mean over labels; ``nan`` if no
        label occurs in any target.
    """
    per_label = torch.nanmean(per_case.float(), dim=0)
    if bool(torch.isnan(per_label).all()):
        logger.debug("mean_dice undefined: no scored label occurs in the target")
        return float("nan")
    return float(torch.nanmean(per_label))
