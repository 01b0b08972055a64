"""Reading a pretrained file's tensors (``[model.pretrained]``) without executing anything.

The three formats of :mod:`unicon_model.pretrained` (``unicon`` folders, ``safetensors``,
``torch`` state dicts read with ``torch.load(weights_only=True)``) are read here by
:func:`read_pretrained`, bounded in size and checked against the plan's ``sha256`` pin;
matching the tensors to the model is :func:`unicon_model.pretrained.seed_from_pretrained`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from unicon_model.checkpoint import MANIFEST_NAME, load_checkpoint, read_manifest
from unicon_model.errors import CheckpointError, UniconModelError
from unicon_model.schema import PretrainedSpec

logger = logging.getLogger(__name__)

MAX_PRETRAINED_BYTES = 4 * 2**30
"""Largest pretrained file (or sum of a UNICON folder's tensor files) read: 4 GiB."""
MAX_MANIFEST_BYTES = 64 * 2**20
"""Largest ``manifest.json`` of a UNICON folder read: 64 MiB."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_NESTING = 8


class PretrainedError(UniconModelError):
    """A pretrained file is missing, too large, pickled, malformed or does not fit the model.

    Parameters
    ----------
    field
        The plan field at fault (``model.pretrained.path``, ``model.pretrained.mapping``...).
    message
        What is wrong, naming the file, and the fix.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def resolve_pretrained_path(spec: PretrainedSpec, base_dir: str | Path | None = None) -> Path:
    """The spec's path, a relative one resolved against ``base_dir`` (default: the cwd)."""
    path = Path(spec.path).expanduser()
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else Path.cwd()) / path
    return path.resolve()


def _format_of(spec: PretrainedSpec, path: Path) -> str:
    if spec.format is not None:
        return spec.format
    if path.is_dir():
        return "unicon"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise PretrainedError(
        "model.pretrained.format",
        f'cannot tell the format of {path} from its name; set format = "unicon" (a folder '
        f'with manifest.json), "safetensors" or "torch" ({", ".join(TORCH_SUFFIXES)})',
    )


def _read_bounded(path: Path, limit: int, what: str = "model.pretrained.path") -> bytes:
    try:
        size = path.stat().st_size
        if size > limit:
            raise PretrainedError(
                what, f"{path} is {size} bytes, more than the {limit} bytes read at most"
            )
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as e:
        raise PretrainedError(what, f"cannot read {path}: {e.strerror or e}") from e
    if len(data) > limit:
        raise PretrainedError(what, f"{path} grew past {limit} bytes while it was read")
    return data


def _flatten(value: Any, prefix: str, out: dict[str, Tensor], depth: int = 0) -> int:
    """Collect tensors of nested dicts into ``out`` with dotted names; count skipped leaves."""
    if isinstance(value, Tensor):
        out[prefix.removesuffix(".")] = value
        return 0
    if isinstance(value, Mapping) and depth < _MAX_NESTING:
        return sum(_flatten(v, f"{prefix}{k}.", out, depth + 1) for k, v in value.items())
    return 1


def _read_torch(path: Path, data: bytes) -> dict[str, Tensor]:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        reason = f"it needs {found.group(1)}" if found else f"{str(e).splitlines()[0][:200]}"
        raise PretrainedError(
            "model.pretrained.path",
            f"{path} holds pickled Python objects, not only tensors, and is refused by "
            f"torch.load(weights_only=True) ({reason}). UNICON never unpickles objects from "
            "a file: save the state dict alone (torch.save(model.state_dict(), path)) or "
            "convert it to safetensors",
        ) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... on bad files
        raise PretrainedError(
            "model.pretrained.path",
            f"{path} is not a readable torch state-dict file ({type(e).__name__}: "
            f"{str(e)[:300]}); check the file or its format",
        ) from e
    tensors: dict[str, Tensor] = {}
    skipped = _flatten(obj, "", tensors)
    if skipped:
        logger.info("%s: skipped %d entries that are not tensors", path, skipped)
    return tensors


def _read_unicon(path: Path, limit: int) -> tuple[str, dict[str, Tensor]]:
    if not (path / MANIFEST_NAME).is_file() and (path / "model" / MANIFEST_NAME).is_file():
        path = path / "model"  # an exported package
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PretrainedError(
            "model.pretrained.path",
            f"{path} is not a UNICON checkpoint: it has no {MANIFEST_NAME} (nor "
            f"model/{MANIFEST_NAME}); point at a registry version folder or an export",
        )
    manifest_bytes = _read_bounded(manifest_path, MAX_MANIFEST_BYTES)
    sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    try:
        manifest = read_manifest(path)
        total = 0
        for record in manifest.components.values():
            total += (path / record.file).stat().st_size
        if total > limit:
            raise PretrainedError(
                "model.pretrained.path",
                f"{path} holds {total} bytes of tensors, more than the {limit} read at most",
            )
        _, components = load_checkpoint(path)
    except CheckpointError as e:
        raise PretrainedError("model.pretrained.path", f"{e}") from e
    except OSError as e:
        raise PretrainedError("model.pretrained.path", f"cannot read {path}: {e}") from e
    if hashlib.sha256(_read_bounded(manifest_path, MAX_MANIFEST_BYTES)).hexdigest() != sha256:
        raise PretrainedError(
            "model.pretrained.path", f"{manifest_path} changed while it was read; try again"
        )
    return sha256, {k: v for c in components.values() for k, v in c.items()}


def _file_tensors(path: Path, kind: str, limit: int) -> tuple[str, dict[str, Tensor]]:
    """The sha256 and tensors of a ``safetensors`` or ``torch`` file."""
    if not path.is_file():
        raise PretrainedError(
            "model.pretrained.path", f"{path} is not a file (format {kind!r} needs one)"
        )
    data = _read_bounded(path, limit)
    sha256 = hashlib.sha256(data).hexdigest()
    if kind == "safetensors":
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as e:  # safetensors raises its own error types
            raise PretrainedError(
                "model.pretrained.path",
                f"{path} is not a valid safetensors file ({str(e)[:300]}); check the "
                "file or set format",
            ) from e
    else:
        tensors = _read_torch(path, data)
    return sha256, tensors


def _read_source(path: Path, kind: str, limit: int) -> tuple[str, dict[str, Tensor]]:
    """The sha256 and tensors of ``path`` read as format ``kind``."""
    if kind == "unicon":
        if not path.is_dir():
            raise PretrainedError(
                "model.pretrained.path",
                f'{path} is a file, but format "unicon" needs a checkpoint folder',
            )
        return _read_unicon(path, limit)
    return _file_tensors(path, kind, limit)


def read_pretrained(
    spec: PretrainedSpec, base_dir: str | Path | None = None, *, max_bytes: int | None = None
) -> tuple[Path, str, str, dict[str, Tensor]]:
    """Read a pretrained file's tensors under their own names, without executing anything.

    Parameters
    ----------
    spec
        The plan's ``[model.pretrained]``.
    base_dir
        Folder a relative path is resolved against (default: the current directory).
    max_bytes
        Largest file read (default :data:`MAX_PRETRAINED_BYTES`).

    Returns
    -------
    tuple
        The resolved path, its format, its sha256 and its tensors (file's names).

    Raises
    ------
    PretrainedError
        If the file is missing, too large, of another format, pickles objects, holds no
        tensors or does not match ``spec.sha256``.
    """
    limit = MAX_PRETRAINED_BYTES if max_bytes is None else max_bytes
    path = resolve_pretrained_path(spec, base_dir)
    if not path.exists():
        where = "" if Path(spec.path).is_absolute() else " (relative paths start at the cwd)"
        raise PretrainedError(
            "model.pretrained.path",
            f"{path} does not exist{where}; fix the path or remove [model.pretrained]",
        )
    kind = _format_of(spec, path)
    sha256, tensors = _read_source(path, kind, limit)
    if spec.sha256 is not None and spec.sha256 != sha256:
        raise PretrainedError(
            "model.pretrained.sha256",
            f"{path} has sha256 {sha256}, not the pinned {spec.sha256}: the file changed "
            "since the plan was written; restore it or update the pin",
        )
    if not tensors:
        raise PretrainedError("model.pretrained.path", f"{path} holds no tensors")
    return path, kind, sha256, tensors
