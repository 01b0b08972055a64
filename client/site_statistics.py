"""Analytic statistics of a site: the sufficient statistics of a stage's analytic heads.

:func:`analytic_statistics` answers a train request of an analytic stage (see
:func:`client.site_training.serve_train`): on the frozen features of the site's training
cases it sums the ridge statistics (:class:`unicon_model.ridge.RidgeStatistics`) of every
analytic head the stage solves, once, with no training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from client.data import CaseDataset
from client.site_replies import SiteReply
from unicon_model.analytic import (
    AnalyticSegmentationHead,
    RidgeStatistics,
    one_hot_targets,
    segmentation_statistics,
    voxel_class_weights,
)
from unicon_model.model import UniconModel
from unicon_model.protocol import KEY_NUM_EXAMPLES
from unicon_model.schema import ModalitySpec, TaskSpec

logger = logging.getLogger(__name__)


def analytic_statistics(
    model: UniconModel,
    dataset: CaseDataset,
    tasks: Mapping[str, Any],
    modality: ModalitySpec,
) -> SiteReply:
    """Sufficient statistics of every analytic head of the stage on frozen features.

    Classification heads: one sample per labelled case (pooled features). Segmentation
    heads: one weighted sample per voxel of every case with a mask (see
    :func:`segmentation_site_statistics`). The reply's num-examples is the largest number
    of cases of a task.
    """
    model.eval()
    arrays: dict[str, Tensor] = {}
    count = 0
    classification = {n: s for n, s in tasks.items() if s.kind != "segmentation"}
    features = None
    if classification and len(dataset):
        with torch.no_grad():
            images = torch.stack([s["image"] for s in dataset.samples])
            features = model.pooled_features(images, modality=modality.name)
    for name, spec in tasks.items():
        if spec.kind == "segmentation":
            result = segmentation_site_statistics(model, dataset, name, spec, modality)
            if result is None:
                continue
            stats, cases = result
        else:
            labels = [int(s[f"{name}:label"]) for s in dataset.samples]
            keep = [i for i, y in enumerate(labels) if y >= 0]
            if features is None or not keep:
                continue
            stats = RidgeStatistics.from_data(
                features[keep].double().numpy(),
                one_hot_targets([labels[i] for i in keep], spec.num_outputs),
            )
            cases = len(keep)
        count = max(count, cases)
        for stat, value in stats.to_arrays().items():
            arrays[f"{name}/{stat}"] = torch.from_numpy(value)
    return SiteReply(arrays, {KEY_NUM_EXAMPLES: float(count)})


def segmentation_site_statistics(
    model: UniconModel,
    dataset: CaseDataset,
    name: str,
    spec: TaskSpec,
    modality: ModalitySpec,
    *,
    batch_size: int = 4,
) -> tuple[RidgeStatistics, int] | None:
    """Per-voxel ridge statistics of the analytic segmentation head ``name`` at a site.

    Every voxel of every training case with a mask counts, weighted by the fixed class
    weight of its label (:func:`unicon_model.analytic.voxel_class_weights`).

    Returns
    -------
    tuple or None
        The statistics and the number of cases; ``None`` when no case has a mask.
    """
    head = model.tasks[name]
    if not isinstance(head, AnalyticSegmentationHead):
        raise TypeError(f"task {name!r} has no analytic segmentation head")
    weights = voxel_class_weights(
        spec.num_outputs, spec.foreground_prior, class_balance=spec.class_balance
    )
    keep = [s for s in dataset.samples if bool(s[f"{name}:has"])]
    total: RidgeStatistics | None = None
    for start in range(0, len(keep), batch_size):
        batch = keep[start : start + batch_size]
        with torch.no_grad():
            images = torch.stack([s["image"] for s in batch])
            voxels = head.voxel_features(model.encode(images, modality=modality.name), images)
        masks = torch.stack([s[f"{name}:mask"] for s in batch])
        stats = segmentation_statistics(voxels, masks, weights)
        total = stats if total is None else total + stats
    return None if total is None else (total, len(keep))
