"""``[model]``: the backbone's architecture and its optional pretrained seed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from unicon_model.names import is_valid_name
from unicon_model.schema.base import BACKBONE, _Frozen


class PretrainedSpec(_Frozen):
    """``[model.pretrained]``: seed components of the first stage from a local file.

    Only the coordinator reads the file (:func:`unicon_model.pretrained.seed_from_pretrained`);
    sites receive the seeded components as usual.

    Attributes
    ----------
    path
        The file or folder; a relative path is resolved against the coordinator's current
        working directory (use an absolute path in deployments).
    format
        ``unicon`` (a registry version or an export: a folder with ``manifest.json``),
        ``safetensors`` (a torch/MONAI state dict saved with safetensors) or ``torch`` (a
        ``.pt``/``.pth`` state dict of tensors, read with ``torch.load(weights_only=True)``);
        by default guessed from the path (folder, ``.safetensors``, ``.pt``/``.pth``/``.bin``).
    components
        Components to seed (``backbone``, ``modality/<name>``, ``task/<name>``) of the
        model as grown by the first stage. By default ``backbone`` plus every first-stage
        modality adapter the file holds.
    mapping
        Key prefix renames from the file's names to the model's, e.g.
        ``{"encoder." = "backbone."}``; the longest matching prefix wins.
    ignore
        Prefixes (the file's names) of tensors to skip, e.g. a decoder's ``["decoder."]``.
    strict
        Refuse a file with missing, unexpected or wrong-shaped keys (default); when false,
        load the matching keys and log a warning listing the rest.
    sha256
        Optional pin: refuse the file unless its sha256 (of ``manifest.json`` for a
        ``unicon`` folder) is this one.
    """

    path: str = Field(min_length=1, max_length=4096)
    format: Literal["unicon", "safetensors", "torch"] | None = None
    components: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=64)
    mapping: dict[str, str] = Field(default_factory=dict, max_length=256)
    ignore: tuple[str, ...] = Field(default=(), max_length=256)
    strict: bool = True
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("components")
    @classmethod
    def _component_names(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return value
        bad = []
        for name in value:
            kind, _, rest = name.partition("/")
            if name != BACKBONE and not (kind in ("modality", "task") and is_valid_name(rest)):
                bad.append(name)
        if bad:
            raise ValueError(
                f"{bad} are not component names; use 'backbone', 'modality/<name>' or 'task/<name>'"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"{list(value)} lists a component twice")
        return value

    @field_validator("mapping")
    @classmethod
    def _mapping_bounded(cls, value: dict[str, str]) -> dict[str, str]:
        long = [k for k, v in value.items() if len(k) > 512 or len(v) > 512]
        if long:
            raise ValueError(f"prefixes longer than 512 characters: {long[:3]}")
        return value


class ModelSpec(_Frozen):
    """Architecture of the backbone and defaults shared by every component.

    Attributes
    ----------
    spatial_dims
        2 for slices, 3 for volumes.
    widths
        Channels of each encoder level; level ``i > 0`` halves the resolution.
    norm
        ``group`` or ``instance`` normalisation (never batch norm, so Opacus accepts it).
    adapter_rank
        Bottleneck channels of the residual adapters inside each encoder level.
    head_hidden
        Hidden width of classification/survival heads.
    seed
        Seed of the deterministic initialisation of every component.
    pretrained
        Seed the first stage's components from a local file (``[model.pretrained]``, see
        :class:`PretrainedSpec`) instead of the seeded random initialisation.
    """

    spatial_dims: Literal[2, 3] = 3
    widths: tuple[int, ...] = Field(default=(8, 16, 32, 64), min_length=2, max_length=6)
    norm: Literal["group", "instance"] = "group"
    adapter_rank: int = Field(default=4, ge=1, le=256)
    head_hidden: int = Field(default=32, ge=1, le=4096)
    seed: int = Field(default=0, ge=0)
    pretrained: PretrainedSpec | None = None

    @model_validator(mode="after")
    def _widths_positive(self) -> ModelSpec:
        if any(w < 1 or w > 2048 for w in self.widths):
            raise ValueError(f"widths must each be in 1..2048, got {list(self.widths)}")
        return self
