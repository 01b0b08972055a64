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

The file is read by :mod:`unicon_model.pretrained_files` (:func:`read_pretrained`, re-exported
here); this module matches its tensors to the model and loads them.

Only the coordinator reads the file (:func:`seed_from_pretrained`, before the first round);
the sites receive the seeded components like any other. A relative ``path`` is resolved
against ``base_dir``, by default the current working directory of the process (``unicon
plan check`` and the coordinator alike): use an absolute path in deployments.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from unicon_model.checkpoint import PretrainedRecord
from unicon_model.components import component_of_key, key_prefix, load_state
from unicon_model.errors import ComponentError, UniconModelError
from unicon_model.pretrained_files import (
    MAX_MANIFEST_BYTES,
    MAX_PRETRAINED_BYTES,
    TORCH_SUFFIXES,
    PretrainedError,
    read_pretrained,
    resolve_pretrained_path,
)
from unicon_model.schema import BACKBONE, Plan, PretrainedSpec, modality_component

logger = logging.getLogger(__name__)

MAX_LISTED = 100
"""Keys listed per kind of mismatch in an error (the count is always complete)."""

__all__ = [
    "MAX_LISTED",
    "MAX_MANIFEST_BYTES",
    "MAX_PRETRAINED_BYTES",
    "TORCH_SUFFIXES",
    "PretrainedError",
    "PretrainedSource",
    "pretrained_problems",
    "read_pretrained",
    "resolve_pretrained_path",
    "seed_from_pretrained",
]


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


def _targets(path: Path, renamed: Mapping[str, str]) -> dict[str, list[str]]:
    """Model name -> the file names renamed to it; refuse a mapping that merges tensors."""
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
    return collisions


def _components(
    spec: PretrainedSpec, present: set[str], renamed: Mapping[str, str]
) -> tuple[str, ...]:
    """The components to seed: the spec's, else the backbone and the adapters the file has."""
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
    return components


@dataclass
class _Match:
    """The file's tensors against the model's keys of the seeded components."""

    wanted: set[str]
    missing: list[str]
    matched: dict[str, Tensor] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)

    def report(self) -> str:
        """Every mismatch, listed by kind ('' when everything matched)."""
        return (
            _listed("missing key(s) (the model has them, the file does not)", self.missing)
            + _listed("unexpected key(s) (the file has them, the model does not)", self.unexpected)
            + _listed("wrong-shaped key(s)", self.wrong)
        )


def _match(
    own: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor],
    renamed: Mapping[str, str],
    targets: Mapping[str, list[str]],
    components: tuple[str, ...],
) -> _Match:
    """Sort every renamed tensor into matched, unexpected or wrong (shape or dtype)."""
    prefixes = tuple(key_prefix(c) for c in components)
    wanted = {k for k in own if k.startswith(prefixes)}
    found = _Match(wanted, sorted(k for k in wanted if k not in targets))
    for source, target in sorted(renamed.items()):
        value = tensors[source]
        shown = source if source == target else f"{source} (as {target})"
        if target not in wanted:
            if _component(target) is None or target.startswith(prefixes):
                found.unexpected.append(f"{shown} {tuple(value.shape)}")
            continue  # a component of the model's naming scheme that is not seeded
        expected = own[target]
        if tuple(value.shape) != tuple(expected.shape):
            found.wrong.append(f"{shown}: file {tuple(value.shape)}, model {tuple(expected.shape)}")
        elif value.dtype != expected.dtype and not (
            value.is_floating_point() and expected.is_floating_point()
        ):
            found.wrong.append(f"{shown}: file dtype {value.dtype}, model {expected.dtype}")
        else:
            found.matched[target] = value
    return found


def _refuse_not_finite(path: Path, matched: Mapping[str, Tensor]) -> None:
    """Refuse a file whose matched floating-point tensors hold NaN or Inf."""
    not_finite = sorted(
        k for k, v in matched.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )
    if not_finite:
        raise PretrainedError(
            "model.pretrained.path",
            f"{path}: tensors with NaN or Inf values: {not_finite[:MAX_LISTED]}; the file is "
            "damaged or was saved from a diverged model",
        )


def _check_fit(
    spec: PretrainedSpec, path: Path, kind: str, components: tuple[str, ...], found: _Match
) -> None:
    """Refuse mismatches (strict, or nothing matched); else log what is left out."""
    report = found.report()
    if report and (spec.strict or not found.matched):
        fix = (
            "set [model.pretrained] mapping (file prefix -> model prefix, e.g. "
            '{"encoder." = "backbone."}), ignore (file prefixes to skip), components, or '
            "strict = false to load only the keys that match"
        )
        if not found.matched:
            fix = "no key of the file matches the model; " + fix
        raise PretrainedError(
            "model.pretrained.mapping",
            f"{path} ({kind}) does not fit components {list(components)}:{report}\n  Fix: {fix}",
        )
    if report:
        logger.warning(
            "%s: non-strict seeding loaded %d of %d key(s) of %s; left out:%s",
            path,
            len(found.matched),
            len(found.wanted),
            list(components),
            report,
        )


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
    spec, base_dir, max_bytes
        As :func:`read_pretrained`: the plan's ``[model.pretrained]``, the folder a relative
        path is resolved against, the largest file read.

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
    targets = _targets(path, renamed)
    components = _components(spec, present, renamed)
    found = _match(own, tensors, renamed, targets, components)
    _refuse_not_finite(path, found.matched)
    _check_fit(spec, path, kind, components, found)
    load_state(model, found.matched)
    logger.info(
        "seeded %s from %s (%s, sha256 %s): %d tensors",
        list(components),
        path,
        kind,
        sha256[:12],
        len(found.matched),
    )
    return PretrainedSource(
        path=path,
        sha256=sha256,
        format=kind,
        components=components,
        loaded_keys=tuple(sorted(found.matched)),
        skipped=tuple(found.missing + found.unexpected + found.wrong),
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
