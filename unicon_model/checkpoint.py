"""The checkpoint format: one safetensors file per component plus a JSON manifest.

Layout of a checkpoint directory::

    manifest.json                 format, version, model config, components, lineage
    backbone.safetensors          one file per component ("modality/pet" -> modality--pet)
    modality--ct.safetensors
    task--lesion-class.safetensors

The manifest records, per component, its file, the sha256 of the file's bytes, the
:func:`tensor_digest` of its tensors and each tensor's dtype and shape. Loading hashes the
bytes it read (once, the same bytes it parses) and refuses a file whose hash does not match,
so a truncated or tampered file is never used. Nothing is unpickled: tensors are safetensors,
metadata is JSON.

Writes are atomic: the checkpoint is written into a temporary sibling directory, fsynced and
renamed into place, so a crash leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from unicon_model.durable import fsync_directory, write_synced
from unicon_model.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "unicon-checkpoint/1"
"""Format tag written into every manifest; other tags are refused."""

MANIFEST_NAME = "manifest.json"

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "CheckpointError",
    "CheckpointManifest",
    "ComponentRecord",
    "Lineage",
    "PretrainedRecord",
    "TensorInfo",
    "component_file_name",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "tensor_digest",
    "verify_checkpoint",
]


class TensorInfo(BaseModel):
    """Dtype and shape of one stored tensor."""

    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[int]


class ComponentRecord(BaseModel):
    """One component's file and its integrity data."""

    model_config = ConfigDict(extra="forbid")
    name: str
    file: str
    sha256: str
    digest: str
    bytes: int
    parameters: int
    tensors: dict[str, TensorInfo]


class PretrainedRecord(BaseModel):
    """The pretrained file a model's first version was seeded from.

    Attributes
    ----------
    path
        The file or folder, as resolved when it was read.
    sha256
        sha256 of the file's bytes (of ``manifest.json`` for a UNICON checkpoint folder,
        which itself holds every tensor file's sha256).
    format
        ``unicon``, ``safetensors`` or ``torch``.
    components
        The components seeded from it.
    """

    model_config = ConfigDict(extra="forbid")
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    format: str
    components: list[str] = Field(default_factory=list)


class Lineage(BaseModel):
    """Where a model version comes from.

    Attributes
    ----------
    plan, stage, stage_index
        The plan and the stage that produced it.
    parent
        The version it grew from (``None`` for the first).
    sites
        Sites that contributed.
    rounds
        Federated rounds run.
    epsilon
        Privacy spent per site (ε at the plan's δ) when the version was made.
    metrics
        Pooled evaluation metrics (``task@modality/metric`` keys).
    created_at
        UTC time of creation (ISO 8601).
    pretrained
        The pretrained file the first version was seeded from (``None`` when it started
        from the seeded random initialisation; absent in manifests written before it).
    """

    model_config = ConfigDict(extra="forbid")
    plan: str = ""
    stage: str = ""
    stage_index: int = -1
    parent: str | None = None
    sites: list[str] = Field(default_factory=list)
    rounds: int = 0
    epsilon: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    pretrained: PretrainedRecord | None = None


class CheckpointManifest(BaseModel):
    """The ``manifest.json`` of a checkpoint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    format: str = FORMAT
    version: str
    model_config_: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    components: dict[str, ComponentRecord]
    lineage: Lineage = Field(default_factory=Lineage)

    def to_json(self) -> str:
        """Serialise with the ``model_config`` field name."""
        return self.model_dump_json(by_alias=True, indent=2)

    @property
    def parameters(self) -> int:
        """Total number of stored values."""
        return sum(c.parameters for c in self.components.values())

    @property
    def bytes(self) -> int:
        """Total size of the tensor files."""
        return sum(c.bytes for c in self.components.values())


def component_file_name(component: str) -> str:
    """File name of a component: ``modality/pet`` -> ``modality--pet.safetensors``."""
    if not component or component.startswith(".") or "\\" in component or ".." in component:
        raise CheckpointError(f"invalid component name {component!r}")
    return component.replace("/", "--") + ".safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """Content hash of named tensors, independent of device, layout and file encoding.

    sha256 over the sorted names with each tensor's dtype, shape and raw bytes (CPU,
    contiguous). Two state dicts with equal names, dtypes, shapes and values have equal
    digests.
    """
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        header = f"{name}\0{_dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0"
        sha.update(header.encode())
        sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def _write_component(staging: Path, name: str, component: Mapping[str, Tensor]) -> ComponentRecord:
    """Write one component's safetensors file into ``staging`` and describe it."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in component.items()}
    data = save_safetensors_bytes(tensors, metadata={"component": name})
    file_name = component_file_name(name)
    write_synced(staging / file_name, data)
    return ComponentRecord(
        name=name,
        file=file_name,
        sha256=hashlib.sha256(data).hexdigest(),
        digest=tensor_digest(tensors),
        bytes=len(data),
        parameters=sum(t.numel() for t in tensors.values()),
        tensors={
            k: TensorInfo(dtype=_dtype_name(t.dtype), shape=list(t.shape))
            for k, t in sorted(tensors.items())
        },
    )


def _replace_directory(staging: Path, directory: Path) -> None:
    """Rename the fsynced ``staging`` directory to ``directory``, replacing any old one."""
    old: Path | None = None
    if directory.exists():
        old = directory.parent / f".{directory.name}-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(staging, directory)
    fsync_directory(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    directory: str | Path,
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    version: str,
    model_config: Mapping[str, Any] | None = None,
    lineage: Lineage | None = None,
) -> CheckpointManifest:
    """Write a checkpoint atomically (replacing ``directory`` if it exists).

    Parameters
    ----------
    directory
        Target checkpoint directory.
    components
        Component name -> its named tensors (full state-dict keys).
    version
        Version id recorded in the manifest.
    model_config
        ``UniconModel.config()``, enough to rebuild the architecture.
    lineage
        Where the version comes from.

    Returns
    -------
    CheckpointManifest
        The manifest written.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
    try:
        records: dict[str, ComponentRecord] = {}
        for name in sorted(components):
            records[name] = _write_component(staging, name, components[name])
        manifest = CheckpointManifest(
            version=version,
            model_config=dict(model_config or {}),
            components=records,
            lineage=lineage or Lineage(),
        )
        write_synced(staging / MANIFEST_NAME, manifest.to_json().encode())
        fsync_directory(staging)
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.debug("saved checkpoint %s (%d components)", directory, len(records))
    return manifest


def read_manifest(directory: str | Path) -> CheckpointManifest:
    """Read and validate ``manifest.json`` of a checkpoint (no tensors loaded)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {directory} is not a checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: format {found!r} is not {FORMAT!r}")
    try:
        manifest = CheckpointManifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise CheckpointError(f"{path} is malformed: {problems}") from e
    for name, record in manifest.components.items():
        if record.file != component_file_name(name):
            raise CheckpointError(
                f"{path}: component {name!r} points to {record.file!r}, "
                f"expected {component_file_name(name)!r}"
            )
    return manifest


def _load_component(directory: Path, record: ComponentRecord) -> dict[str, Tensor]:
    path = directory / record.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != record.sha256:
        raise CheckpointError(
            f"{path}: sha256 {actual} does not match the manifest's {record.sha256}; "
            "the file is corrupt or was modified — restore it from a backup"
        )
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    expected = {k: (i.dtype, i.shape) for k, i in record.tensors.items()}
    found = {k: (_dtype_name(t.dtype), list(t.shape)) for k, t in tensors.items()}
    if expected != found:
        raise CheckpointError(f"{path}: tensors {found} differ from the manifest's {expected}")
    return tensors


def load_checkpoint(
    directory: str | Path, components: Iterable[str] | None = None
) -> tuple[CheckpointManifest, dict[str, dict[str, Tensor]]]:
    """Load (a subset of) a checkpoint's components, verifying every file's sha256.

    Parameters
    ----------
    directory
        The checkpoint directory.
    components
        Names to load; all when ``None``.

    Returns
    -------
    tuple
        The manifest and component name -> tensors.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    names = list(manifest.components) if components is None else list(components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise CheckpointError(
            f"{directory}: no component(s) {unknown}; it holds {sorted(manifest.components)}"
        )
    loaded = {n: _load_component(directory, manifest.components[n]) for n in names}
    return manifest, loaded


def verify_checkpoint(directory: str | Path) -> list[str]:
    """Every integrity problem of a checkpoint (empty when it is intact)."""
    directory = Path(directory)
    try:
        manifest = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for record in manifest.components.values():
        try:
            _load_component(directory, record)
        except CheckpointError as e:
            problems.append(str(e))
    return problems
