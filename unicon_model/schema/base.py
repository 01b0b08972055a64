"""Building blocks shared by every part of the plan schema.

The component names (``backbone``, ``modality/<name>``, ``task/<name>``), the bounds that keep
a plan safe to run at a site, the validated :data:`Name` type and the frozen base model whose
config refuses unknown fields and non-finite floats.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from unicon_model.names import NAME_PATTERN

BACKBONE = "backbone"
"""Component name of the shared encoder."""

MAX_PATCH_EDGE = 4096
"""Largest ``data.patch_size`` entry (voxels along one axis)."""
MAX_PATCH_VOXELS = 256**3
"""Largest patch in voxels (the product of ``data.patch_size``): 16.8 M, a 256³ volume or a
4096² slice; as float32 that is 64 MiB per input channel and case before the encoder's
activations. A site lowers it with ``max_patch_voxels`` in its policy."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
"""Longest timeout a plan may set (seconds): 7 days."""


def modality_component(name: str) -> str:
    """Return the component name of modality adapter ``name`` (``modality/<name>``)."""
    return f"modality/{name}"


def task_component(name: str) -> str:
    """Return the component name of task head ``name`` (``task/<name>``)."""
    return f"task/{name}"


class _Frozen(BaseModel):
    # allow_inf_nan=False: every float of a plan (lr, weights, epsilon, windows...) is finite
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


Name = Annotated[str, Field(pattern=NAME_PATTERN)]
