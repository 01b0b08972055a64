"""Evaluation metrics: classification, segmentation, survival and continual learning.

The numpy-only metrics are imported eagerly; the segmentation and survival metrics (which import
torch and MONAI) are loaded on first access, so importing this package stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from unicon_model.metrics.classification import accuracy, roc_auc
from unicon_model.metrics.continual import (
    ContinualSummary,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    forward_transfer,
    summarise,
)

if TYPE_CHECKING:
    from unicon_model.metrics.segmentation import dice, mean_dice
    from unicon_model.metrics.survival import concordance_index, cox_partial_likelihood_loss

__all__ = [
    "ContinualSummary",
    "accuracy",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "concordance_index",
    "cox_partial_likelihood_loss",
    "dice",
    "forward_transfer",
    "mean_dice",
    "roc_auc",
    "summarise",
]

_LAZY = {
    "dice": "unicon_model.metrics.segmentation",
    "mean_dice": "unicon_model.metrics.segmentation",
    "concordance_index": "unicon_model.metrics.survival",
    "cox_partial_likelihood_loss": "unicon_model.metrics.survival",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unicon_model.metrics' has no attribute {name!r}")
