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

The parts live next to this module: :mod:`client.case_labels` (labels as tensors),
:mod:`client.case_cache` (the disk cache) and :mod:`client.case_augmentation` (the
augmentation); their names used elsewhere are importable from here too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from torch import Tensor
from torch.utils.data import Dataset

from client.case_augmentation import AugmentedCases, Augmenter
from client.case_cache import CACHE_VERSION, CaseCache
from client.case_labels import encode_labels, label_key
from client.errors import DataError
from client.images import read_image
from client.manifest import Case, SiteManifest
from client.transforms import DEFAULT_CT_WINDOW, preprocessing
from unicon_model.schema import DataSpec, ModalitySpec, TaskSpec

__all__ = [
    "CACHE_VERSION",
    "AugmentedCases",
    "Augmenter",
    "CaseDataset",
    "SkippedCase",
    "build_dataset",
    "label_key",
    "preprocess_files",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SkippedCase:
    """A case left out of a dataset, with the reason."""

    case: str
    reason: str


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


def _case_images(
    manifest: SiteManifest,
    case: Case,
    modality: ModalitySpec,
    masks: Mapping[str, str],
    cache: CaseCache,
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


def _cache_for(data: DataSpec, cache_dir: Path | None) -> CaseCache:
    """The cache of :func:`build_dataset`, keyed by the plan's preprocessing settings."""
    return CaseCache(
        cache_dir,
        settings={
            "patch_size": list(data.patch_size),
            "spacing": None if data.spacing is None else list(data.spacing),
            "ct_window": list(data.ct_window),
        },
    )


def _mask_files(
    case: Case, split: str, modality: ModalitySpec, tasks: Mapping[str, TaskSpec]
) -> dict[str, str] | None:
    """The segmentation mask files of ``case`` to read; ``None`` if the case is not loaded.

    A case is loaded when it is in ``split``, has every input image of the modality and a
    label of one of ``tasks`` (or one of them is self-supervised).
    """
    if case.split != split or not all(k in case.images for k in modality.input_keys):
        return None
    sources = {t: spec.label_source for t, spec in tasks.items()}
    labelled = [t for t in tasks if sources[t] in case.labels]
    if not labelled and not any(spec.self_supervised for spec in tasks.values()):
        return None
    return {
        t: str(case.labels[sources[t]])
        for t in labelled
        if tasks[t].kind == "segmentation" and isinstance(case.labels[sources[t]], str)
    }


def _load_cases(
    manifest: SiteManifest,
    split: str,
    modality: ModalitySpec,
    tasks: Mapping[str, TaskSpec],
    cache: CaseCache,
) -> tuple[list[dict[str, Tensor]], list[str], list[SkippedCase]]:
    """The samples and case ids of the cases to load, and the cases skipped with the reason."""
    samples: list[dict[str, torch.Tensor]] = []
    case_ids: list[str] = []
    skipped: list[SkippedCase] = []
    declared = {name: task.labels for name, task in manifest.tasks.items() if task.labels}
    for case in manifest.cases:
        masks = _mask_files(case, split, modality, tasks)
        if masks is None:
            continue
        try:
            arrays = _case_images(manifest, case, modality, masks, cache)
            sample = encode_labels(case, tasks, arrays, declared)
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
    return samples, case_ids, skipped


def _augmenter(split: str, data: DataSpec, tasks: Mapping[str, TaskSpec]) -> Augmenter | None:
    """The plan's augmentation for a ``train`` dataset when it is on, else ``None``."""
    augmenter = None
    if split == "train" and data.augmentation.enabled:
        augmenter = Augmenter(
            data.augmentation,
            spatial_dims=len(data.patch_size),
            mask_keys=[
                label_key(t, "mask") for t, spec in tasks.items() if spec.kind == "segmentation"
            ],
        )
    return augmenter


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
    cache = _cache_for(data, cache_dir)
    samples, case_ids, skipped = _load_cases(manifest, split, modality, tasks, cache)
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
    return CaseDataset(
        samples,
        modality=modality.name,
        case_ids=case_ids,
        skipped=skipped,
        augmentation=_augmenter(split, data, tasks),
    )
