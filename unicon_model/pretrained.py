"""Seed the first stage's components from a pretrained file (``[model.pretrained]``).

Three formats, none of which executes code from the file:

``unicon``
    A registry version folder or an exported package (a folder with ``manifest.json``, or
    with ``model/manifest.json``): loaded with :func:`unicon_model.checkpoint.load_checkpoint`,
    which verifies every tensor file's sha256 against the manifest. The recorded sha256 is
    that of ``manifest.json`` (which pins every tensor file in turn).
``safetensors``
    One ``.safetensors`` file holding a torch/MONAI state dict.
``torch``
    One ``.pt``/``.pth``/``.bin``/``.ckpt`` file read **only** with
    ``torch.load(weights_only=True)``: a file that pickles Python objects (a whole
    ``nn.Module``, an optimiser, custom classes) is refused, never unpickled. Nested
    dictionaries (``{"state_dict": {...}}``) are flattened with dots
    (``state_dict.encoder.0.weight``); entries that are not tensors (an epoch number) are
    skipped.

The file's names are renamed by the plan's ``mapping`` (longest matching prefix first),
tensors under an ``ignore`` prefix are skipped, and the result is compared with the model's
keys of the seeded components. A strict spec (the default) refuses the file with one error
listing every missing, unexpected and wrong-shaped key; a non-strict one loads the keys
that match and logs the rest as a warning. Mapped keys that belong to a component of the
model's naming scheme that is not seeded (a task head in an export) are left out silently.

Only the coordinator reads the file (:func:`seed_from_pretrained`, before the first round);
the sites receive the seeded components like any other. A relative ``path`` is resolved
against ``base_dir``, by default the current working directory of the process (``unicon
plan check`` and the coordinator alike): use an absolute path in deployments.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from torch import Tensor

from unicon_model.checkpoint import (
    MANIFEST_NAME,
    PretrainedRecord,
    load_checkpoint,
    read_manifest,
)
from unicon_model.components import component_of_key, key_prefix, load_state
from unicon_model.errors import CheckpointError, ComponentError, UniconModelError
from unicon_model.schema import BACKBONE, Plan, PretrainedSpec, modality_component

logger = logging.getLogger(__name__)

MAX_PRETRAINED_BYTES = 4 * 2**30
"""Largest pretrained file (or sum of a UNICON folder's tensor files) read: 4 GiB."""
MAX_MANIFEST_BYTES = 64 * 2**20
"""Largest ``manifest.json`` of a UNICON folder read: 64 MiB."""
MAX_LISTED = 100
"""Keys listed per kind of mismatch in an error (the count is always complete)."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_MAX_NESTING = 8

__all__ = [
    "MAX_PRETRAINED_BYTES",
    "PretrainedError",
    "PretrainedSource",
    "pretrained_problems",
    "read_pretrained",
    "resolve_pretrained_path",
    "seed_from_pretrained",
]


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


@dataclass(frozen=True)
class PretrainedSource:
    """What :func:`seed_from_pretrained` read and loaded.

    Attributes
    ----------
    path
        The resolved file or folder.
    sha256
        sha256 of the file's bytes (of ``manifest.json`` for a ``unicon`` folder).
    format
        ``unicon``, ``safetensors`` or ``torch``.
    components
        The components seeded.
    loaded_keys
        Model state-dict keys loaded from the file.
    skipped
        Non-strict only: the mismatches left out (empty when everything matched).
    """

    path: Path
    sha256: str
    format: str
    components: tuple[str, ...]
    loaded_keys: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())

    def record(self) -> PretrainedRecord:
        """The lineage record of this source."""
        return PretrainedRecord(
            path=str(self.path),
            sha256=self.sha256,
            format=self.format,
            components=list(self.components),
        )


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
    if kind == "unicon":
        if not path.is_dir():
            raise PretrainedError(
                "model.pretrained.path",
                f'{path} is a file, but format "unicon" needs a checkpoint folder',
            )
        sha256, tensors = _read_unicon(path, limit)
    else:
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
    if spec.sha256 is not None and spec.sha256 != sha256:
        raise PretrainedError(
            "model.pretrained.sha256",
            f"{path} has sha256 {sha256}, not the pinned {spec.sha256}: the file changed "
            "since the plan was written; restore it or update the pin",
        )
    if not tensors:
        raise PretrainedError("model.pretrained.path", f"{path} holds no tensors")
    return path, kind, sha256, tensors


def _rename(
    names: Iterable[str], mapping: Mapping[str, str], ignore: Iterable[str]
) -> dict[str, str]:
    """Model name of each file name (ignored ones left out), longest prefix first."""
    prefixes = sorted(mapping, key=len, reverse=True)
    skip = tuple(ignore)
    renamed: dict[str, str] = {}
    for name in names:
        if skip and name.startswith(skip):
            continue
        for prefix in prefixes:
            if name.startswith(prefix):
                renamed[name] = mapping[prefix] + name[len(prefix) :]
                break
        else:
            renamed[name] = name
    return renamed


def _component(key: str) -> str | None:
    try:
        return component_of_key(key)
    except ComponentError:
        return None


def _listed(title: str, items: list[str]) -> str:
    if not items:
        return ""
    shown = "".join(f"\n    {item}" for item in items[:MAX_LISTED])
    more = f"\n    ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"\n  {len(items)} {title}:{shown}{more}"


def seed_from_pretrained(
    model: torch.nn.Module,
    spec: PretrainedSpec,
    base_dir: str | Path | None = None,
    *,
    max_bytes: int | None = None,
) -> PretrainedSource:
    """Load the pretrained file's tensors into ``model``'s components.

    Parameters
    ----------
    model
        A :class:`~unicon_model.model.UniconModel` grown by the first stage.
    spec
        The plan's ``[model.pretrained]``.
    base_dir
        Folder a relative path is resolved against (default: the current directory).
    max_bytes
        Largest file read (default :data:`MAX_PRETRAINED_BYTES`).

    Returns
    -------
    PretrainedSource
        The file's path, sha256 and format, the components seeded and the keys loaded.

    Raises
    ------
    PretrainedError
        See :func:`read_pretrained`; or a component is not in the model; or (strict) the
        file has missing, unexpected or wrong-shaped keys, all listed at once; or a tensor
        is not finite. The model is unchanged when it is raised.
    """
    path, kind, sha256, tensors = read_pretrained(spec, base_dir, max_bytes=max_bytes)
    own = model.state_dict()
    present = {c for c in (_component(k) for k in own) if c is not None}
    renamed = _rename(tensors, spec.mapping, spec.ignore)
    collisions: dict[str, list[str]] = {}
    for source, target in renamed.items():
        collisions.setdefault(target, []).append(source)
    doubled = {t: s for t, s in collisions.items() if len(s) > 1}
    if doubled:
        raise PretrainedError(
            "model.pretrained.mapping",
            f"{path}: the mapping gives several tensors the same name: "
            + "; ".join(f"{s} -> {t}" for t, s in list(doubled.items())[:10]),
        )
    if spec.components is not None:
        components = tuple(spec.components)
        unknown = [c for c in components if c not in present]
        if unknown:
            raise PretrainedError(
                "model.pretrained.components",
                f"{unknown} are not components of the first stage's model; it has "
                f"{sorted(present)}",
            )
    else:
        targets = {_component(t) for t in renamed.values()}
        adapters = [c for c in sorted(present) if c.startswith(modality_component(""))]
        components = (BACKBONE, *(c for c in adapters if c in targets))
    prefixes = tuple(key_prefix(c) for c in components)
    wanted = {k for k in own if k.startswith(prefixes)}
    missing = sorted(k for k in wanted if k not in collisions)
    unexpected: list[str] = []
    wrong: list[str] = []
    matched: dict[str, Tensor] = {}
    for source, target in sorted(renamed.items()):
        value = tensors[source]
        shown = source if source == target else f"{source} (as {target})"
        if target not in wanted:
            if _component(target) is None or target.startswith(prefixes):
                unexpected.append(f"{shown} {tuple(value.shape)}")
            continue  # a component of the model's naming scheme that is not seeded
        expected = own[target]
        if tuple(value.shape) != tuple(expected.shape):
            wrong.append(f"{shown}: file {tuple(value.shape)}, model {tuple(expected.shape)}")
        elif value.dtype != expected.dtype and not (
            value.is_floating_point() and expected.is_floating_point()
        ):
            wrong.append(f"{shown}: file dtype {value.dtype}, model {expected.dtype}")
        else:
            matched[target] = value
    not_finite = sorted(
        k for k, v in matched.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if not_finite:
        raise PretrainedError(
            "model.pretrained.path",
            f"{path}: tensors with NaN or Inf values: {not_finite[:MAX_LISTED]}; the file is "
            "damaged or was saved from a diverged model",
        )
    report = (
        _listed("missing key(s) (the model has them, the file does not)", missing)
        + _listed("unexpected key(s) (the file has them, the model does not)", unexpected)
        + _listed("wrong-shaped key(s)", wrong)
    )
    if report and (spec.strict or not matched):
        fix = (
            "set [model.pretrained] mapping (file prefix -> model prefix, e.g. "
            '{"encoder." = "backbone."}), ignore (file prefixes to skip), components, or '
            "strict = false to load only the keys that match"
        )
        if not matched:
            fix = "no key of the file matches the model; " + fix
        raise PretrainedError(
            "model.pretrained.mapping",
            f"{path} ({kind}) does not fit components {list(components)}:{report}\n  Fix: {fix}",
        )
    if report:
        logger.warning(
            "%s: non-strict seeding loaded %d of %d key(s) of %s; left out:%s",
            path,
            len(matched),
            len(wanted),
            list(components),
            report,
        )
    load_state(model, matched)
    logger.info(
        "seeded %s from %s (%s, sha256 %s): %d tensors",
        list(components),
        path,
        kind,
        sha256[:12],
        len(matched),
    )
    return PretrainedSource(
        path=path,
        sha256=sha256,
        format=kind,
        components=components,
        loaded_keys=tuple(sorted(matched)),
        skipped=tuple(missing + unexpected + wrong),
    )


def pretrained_problems(plan: Plan, base_dir: str | Path | None = None) -> list[str]:
    """Problems of a plan's ``[model.pretrained]``, checked against its first stage's model.

    Reads the file exactly as the coordinator will (a throwaway model is seeded), so a
    missing, pickled, malformed or mismatched file shows up in ``unicon plan check``.

    Returns
    -------
    list of str
        One problem per line, each starting with its field path
        (``model.pretrained.path: ...``); empty when there is no pretrained file or it fits.
    """
    spec = plan.model.pretrained
    if spec is None:
        return []
    from unicon_model.model import UniconModel  # the model imports the schema: import late

    try:
        model = UniconModel.from_plan(plan, through_stage=0)
        seed_from_pretrained(model, spec, base_dir)
    except PretrainedError as e:
        return [str(e)]
    except UniconModelError as e:
        return [f"model.pretrained: {e}"]
    return []
