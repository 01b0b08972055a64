"""The growing UNICON model: backbone, modality adapters, task heads and their formats.

This package never imports Flower; the coordinator and the sites both build on it. The
model itself (which imports torch and MONAI) is loaded lazily, so the command line starts fast.
"""

from typing import Any

from unicon_model.errors import (
    AnalyticHeadError,
    CheckpointError,
    ComponentError,
    GrowthError,
    PlanError,
    UniconModelError,
)
from unicon_model.schema import ModalitySpec, ModelSpec, Plan, StageSpec, TaskSpec, load_plan

__all__ = [
    "AnalyticHeadError",
    "CheckpointError",
    "ComponentError",
    "GrowthError",
    "ModalitySpec",
    "ModelSpec",
    "Plan",
    "PlanError",
    "StageSpec",
    "TaskSpec",
    "UniconModel",
    "UniconModelError",
    "load_plan",
]


def __getattr__(name: str) -> Any:
    if name == "UniconModel":
        from unicon_model.model import UniconModel

        return UniconModel
    raise AttributeError(f"module 'unicon_model' has no attribute {name!r}")
