"""A site's cases as tensors for one stage: loading, preprocessing, caching, skipping.

Each case becomes a dictionary of tensors: ``image`` ``(C, *patch)`` with one channel per
input of the modality, and per task the label entries named by :func:`label_key`. A case
that cannot be loaded (corrupt file, label outside the plan's classes, mask with unknown
values) is skipped with a logged reason, never a crash of the round.

Preprocessed cases are cached on disk (``.npz`` without pickle) under a key of the source
files' paths, sizes and modification times and the preprocessing settings, so rounds run in
fresh processes do not re-read and re-transform the images.

Random augmentation (the plan's ``data.augmentation``) happens after the cache, on the fly:
a dataset of the ``train`` split carries an :class:`Augmenter`, and only the local training
loop reads it through :meth:`CaseDataset.augmented`. Indexing a dataset directly, and every
val/test dataset, always gives the stored, unaugmented samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import Tensor
from torch.utils.data import Dataset

from client.errors import DataError
from client.images import read_image
from client.manifest import Case, SiteManifest, SurvivalLabel
from client.transforms import DEFAULT_CT_WINDOW, augmentation, preprocessing
from unicon_model.durable import atomic_write
from unicon_model.schema import AugmentationSpec, DataSpec, ModalitySpec, TaskSpec

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bumped when preprocessing changes, so stale cache entries are never used."""


def label_key(task: str, field_name: str) -> str:
    """Key of a per-task entry of a sample: ``<task>:label|time|event|mask|clinical|has``."""
    return f"{task}:{field_name}"


@dataclass(frozen=True)
class SkippedCase:
    """A case left out of a dataset, with the reason."""

    case: str
    reason: str


_SEED_BOUND = 2**32
"""Seeds of MONAI's random states are below this."""


def _plain(value: Any) -> Tensor:
    """A MONAI output as a plain tensor (no MetaTensor metadata in batches)."""
    tensor = torch.as_tensor(value)
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


class Augmenter:
    """Random augmentation of one training sample (the plan's ``data.augmentation``).

    The image and every segmentation mask are transformed together (masks with nearest
    neighbours, so they keep their integer labels); every other entry (classification and
    survival labels, covariates, ``has`` flags) is passed through as is. The stored sample
    is never modified.

    Parameters
    ----------
    spec
        The plan's augmentation settings.
    spatial_dims
        2 or 3.
    mask_keys
        Sample keys of the segmentation masks (``<task>:mask``, ``(*spatial)`` int64).
    """

    def __init__(
        self, spec: AugmentationSpec, *, spatial_dims: int, mask_keys: Sequence[str] = ()
    ) -> None:
        self.spec = spec
        self.mask_keys = tuple(mask_keys)
        self.transform = augmentation(spec, spatial_dims=spatial_dims, mask_keys=self.mask_keys)

    def __call__(self, sample: Mapping[str, Tensor], seed: int) -> dict[str, Tensor]:
        """``sample`` with one random draw of the transforms, reproducible from ``seed``."""
        image = sample["image"]
        data: dict[str, Tensor] = {"image": image}
        for key in self.mask_keys:
            data[key] = sample[key].unsqueeze(0).to(torch.float32)
        self.transform.set_random_state(seed=seed % _SEED_BOUND)
        out = self.transform(data)
        result = dict(sample)
        result["image"] = _plain(out["image"]).to(image.dtype).contiguous()
        for key in self.mask_keys:
            mask = _plain(out[key])[0].round()
            result[key] = mask.to(sample[key].dtype).contiguous()
        return result


class AugmentedCases(Dataset[dict[str, Tensor]]):
    """A training view of a :class:`CaseDataset`: each read is a fresh random augmentation.

    The seed of each draw comes from torch's global random generator, so the augmentation
    follows the local training's seed (:func:`client.trainer.train` seeds that generator,
    from ``os.urandom`` under DP-SGD).
    """

    def __init__(self, cases: CaseDataset, augmenter: Augmenter) -> None:
        self.cases = cases
        self.augmenter = augmenter
        self.modality = cases.modality

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        seed = int(torch.randint(0, _SEED_BOUND, (1,), dtype=torch.int64))
        return self.augmenter(self.cases.samples[index], seed)


class CaseDataset(Dataset[dict[str, torch.Tensor]]):
    """In-memory preprocessed cases of one modality.

    Indexing gives the stored samples, never augmented; :meth:`augmented` is the view the
    local training loop reads.

    Attributes
    ----------
    modality
        Modality name (the model route).
    case_ids
        Case id of each sample.
    skipped
        Cases left out and why.
    augmentation
        The plan's random augmentation of this (training) dataset, or ``None``.
    """

    def __init__(
        self,
        samples: list[dict[str, torch.Tensor]],
        *,
        modality: str,
        case_ids: list[str],
        skipped: list[SkippedCase] | None = None,
        augmentation: Augmenter | None = None,
    ) -> None:
        self.samples = samples
        self.modality = modality
        self.case_ids = case_ids
        self.skipped = skipped or []
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]

    def augmented(self) -> Dataset[dict[str, Tensor]]:
        """What local training reads: randomly augmented samples, or ``self`` if none.

        Only gradient training should read it; evaluation, analytic statistics and Fisher
        information read the dataset itself.
        """
        if self.augmentation is None:
            return self
        return AugmentedCases(self, self.augmentation)

    def count_labelled(self, task: str) -> int:
        """Number of samples with a label for ``task``."""
        key = label_key(task, "has")
        return int(sum(bool(s[key]) for s in self.samples if key in s))


@dataclass
class _Cache:
    directory: Path | None
    hits: int = 0
    misses: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def key(self, files: Sequence[Path]) -> str:
        parts: list[Any] = [CACHE_VERSION, self.settings]
        for path in files:
            stat = path.stat()
            parts.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        if self.directory is None:
            return None
        path = self.directory / f"{key}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None
        self.hits += 1
        return arrays

    def store(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        self.misses += 1
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, **dict(arrays))  # type: ignore[arg-type]

        # A cache of derived data: not fsynced.
        atomic_write(
            self.directory / f"{key}.npz", write, fsync=False, fsync_dir=False, prefix="tmp"
        )


def _case_images(
    manifest: SiteManifest,
    case: Case,
    modality: ModalitySpec,
    masks: Mapping[str, str],
    cache: _Cache,
) -> dict[str, np.ndarray]:
    """Preprocessed image channels and masks of one case (from the cache when possible)."""
    image_paths = [manifest.resolve(case.images[k]) for k in modality.input_keys]
    mask_paths = {task: manifest.resolve(path) for task, path in masks.items()}
    for path in [*image_paths, *mask_paths.values()]:
        if not path.exists():
            raise DataError(f"file {path} does not exist")
    key = cache.key([*image_paths, *mask_paths.values()])
    cached = cache.load(key)
    if cached is not None:
        return cached
    arrays = preprocess_files(
        dict(zip(modality.input_keys, image_paths, strict=True)),
        mask_paths,
        patch_size=cache.settings["patch_size"],
        spacing=cache.settings["spacing"],
        ct_window=cache.settings["ct_window"],
    )
    cache.store(key, arrays)
    return arrays


def preprocess_files(
    images: Mapping[str, Path],
    masks: Mapping[str, Path] | None = None,
    *,
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW,
) -> dict[str, np.ndarray]:
    """Read and preprocess one case's files (the same path for training and inference).

    Parameters
    ----------
    images
        Image key (``ct``, ``pet``, ...) -> file; the key selects the intensity transform.
    masks
        Task name -> label-map file, resampled with nearest neighbours.
    patch_size, spacing, ct_window
        The plan's data settings.

    Returns
    -------
    dict
        Key -> float32 array ``(C, *patch_size)``.

    Raises
    ------
    DataError
        Naming the file that cannot be read, holds NaN/Inf, or fails preprocessing.
    """
    masks = masks or {}
    data: dict[str, Any] = {}
    for name, path in [*images.items(), *masks.items()]:
        array, meta = read_image(path)
        if not np.all(np.isfinite(array)):
            raise DataError(f"{path} contains NaN or infinite voxels")
        affine = meta.get("affine")
        if affine is None:
            voxel = meta.get("spacing") or (1.0,) * (array.ndim - 1)
            affine = np.diag([*voxel, 1.0])
        data[name] = MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(affine))
    transform = preprocessing(
        list(images),
        mask_keys=list(masks),
        patch_size=patch_size,
        spacing=spacing,
        ct_window=ct_window,
    )
    try:
        out = transform(data)
    except Exception as e:  # MONAI wraps transform errors in RuntimeError
        raise DataError(f"preprocessing of {sorted(map(str, images.values()))} failed: {e}") from e
    return {
        name: np.asarray(torch.as_tensor(out[name]).detach().cpu().numpy(), dtype=np.float32)
        for name in [*images, *masks]
    }


def _encode_labels(
    case: Case, tasks: Mapping[str, TaskSpec], arrays: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    sample: dict[str, torch.Tensor] = {}
    for name, spec in tasks.items():
        label = case.labels.get(name)
        has = label is not None or spec.self_supervised
        sample[label_key(name, "has")] = torch.tensor(has)
        if spec.self_supervised:
            continue  # trained on the image alone
        if spec.kind == "classification":
            index = -1
            if has:
                if not isinstance(label, str) or label not in spec.classes:
                    raise DataError(
                        f"label {label!r} of task {name!r} is not one of the plan's classes "
                        f"{list(spec.classes)}"
                    )
                index = spec.classes.index(label)
            sample[label_key(name, "label")] = torch.tensor(index, dtype=torch.long)
        elif spec.kind == "survival":
            time, event = 1.0, 0.0
            if has:
                if not isinstance(label, SurvivalLabel):
                    raise DataError(f"task {name!r} needs a survival label {{time, event}}")
                time, event = float(label.time), float(label.event)
            values: dict[str, float] = {}
            for covariate in spec.covariates:
                value = case.clinical.get(covariate)
                if value is None or not math.isfinite(value):
                    if has:
                        raise DataError(f"clinical covariate {covariate!r} is missing")
                    value = spec.covariate_scaling.get(covariate, (0.0, 1.0))[0]
                values[covariate] = value
            clinical = spec.scaled_covariates(values)
            sample[label_key(name, "time")] = torch.tensor(time, dtype=torch.float32)
            sample[label_key(name, "event")] = torch.tensor(event, dtype=torch.float32)
            sample[label_key(name, "clinical")] = torch.tensor(clinical, dtype=torch.float32)
        else:
            mask_shape = next(iter(arrays.values())).shape[1:]
            mask = np.zeros(mask_shape, dtype=np.int64)
            if has:
                raw = arrays[name][0]
                mask = np.rint(raw).astype(np.int64)
                if mask.min() < 0 or mask.max() >= len(spec.labels):
                    raise DataError(
                        f"mask of task {name!r} has values outside 0..{len(spec.labels) - 1}"
                    )
            sample[label_key(name, "mask")] = torch.from_numpy(mask)
    return sample


def build_dataset(
    manifest: SiteManifest,
    *,
    split: str,
    modality: ModalitySpec,
    tasks: Mapping[str, TaskSpec],
    data: DataSpec,
    cache_dir: Path | None = None,
) -> CaseDataset:
    """Load every case of ``split`` that has the modality's images and a label for a task.

    A self-supervised task (``reconstruction``) among ``tasks`` needs no label: every case
    with the images is loaded then, unlabelled ones included.

    Parameters
    ----------
    manifest
        The site manifest.
    split
        ``train``, ``val`` or ``test``.
    modality
        The modality route; all its input images must be present.
    tasks
        Plan tasks to encode labels for (a case needs a label of at least one of them,
        unless one is self-supervised).
    data
        Patch size, spacing, CT window and augmentation of the plan.
    cache_dir
        Where preprocessed cases are cached; ``None`` disables the disk cache.

    Returns
    -------
    CaseDataset
        With ``skipped`` listing cases that failed to load, and why. A ``train`` dataset
        carries the plan's augmentation (when it is on) for :meth:`CaseDataset.augmented`;
        every other split never has one.
    """
    cache = _Cache(
        cache_dir,
        settings={
            "patch_size": list(data.patch_size),
            "spacing": None if data.spacing is None else list(data.spacing),
            "ct_window": list(data.ct_window),
        },
    )
    samples: list[dict[str, torch.Tensor]] = []
    case_ids: list[str] = []
    skipped: list[SkippedCase] = []
    for case in manifest.cases:
        if case.split != split or not all(k in case.images for k in modality.input_keys):
            continue
        labelled = [t for t in tasks if t in case.labels]
        if not labelled and not any(spec.self_supervised for spec in tasks.values()):
            continue
        masks = {
            t: str(case.labels[t])
            for t in labelled
            if tasks[t].kind == "segmentation" and isinstance(case.labels[t], str)
        }
        try:
            arrays = _case_images(manifest, case, modality, masks, cache)
            sample = _encode_labels(case, tasks, arrays)
        except (DataError, OSError, ValueError) as e:
            reason = str(e)
            logger.warning("site %s: skipping case %s: %s", manifest.site, case.id, reason)
            skipped.append(SkippedCase(case.id, reason))
            continue
        sample["image"] = torch.from_numpy(
            np.concatenate([arrays[k] for k in modality.input_keys], axis=0)
        )
        samples.append(sample)
        case_ids.append(case.id)
    logger.info(
        "site %s: %s split, modality %s: %d case(s), %d skipped, cache %d hit(s) %d miss(es)",
        manifest.site,
        split,
        modality.name,
        len(samples),
        len(skipped),
        cache.hits,
        cache.misses,
    )
    augmenter = None
    if split == "train" and data.augmentation.enabled:
        augmenter = Augmenter(
            data.augmentation,
            spatial_dims=len(data.patch_size),
            mask_keys=[
                label_key(t, "mask") for t, spec in tasks.items() if spec.kind == "segmentation"
            ],
        )
    return CaseDataset(
        samples, modality=modality.name, case_ids=case_ids, skipped=skipped, augmentation=augmenter
    )
