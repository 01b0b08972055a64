"""Label extensions: new labels added to a segmentation task without touching its head.

A label extension is a segmentation task with ``extends`` (:class:`unicon_model.schema.TaskSpec`):
its own component, with its own head (neural or analytic) over the labels ``background`` +
the new ones. The task it extends keeps its head, frozen or not, exactly as it was. The
*merged* label map of the base task is its own map, where each extension, in the order the
plan added them, claims only the voxels still background:

``merged[v] = base[v]`` where ``base[v] > 0``; else the first extension with
``extension[v] = j > 0`` gives ``offset + j - 1``, where ``offset`` counts the labels before
it (background included).

So a voxel the base task gives an earlier label keeps it, and every earlier label's
predicted voxels, and with them its Dice, stay bit-identical whatever an extension learns.
The price: a new structure cannot take voxels the earlier labels claim; a structure inside
another (a lesion in the liver) is a separate segmentation task instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from unicon_model.schema import TaskSpec

if TYPE_CHECKING:
    from unicon_model.model import UniconModel

__all__ = ["extensions_of", "merge_label_maps", "merged_labels", "predict_label_map"]


def extensions_of(task_specs: Mapping[str, TaskSpec], base: str) -> list[TaskSpec]:
    """The extensions of task ``base`` among ``task_specs``, in the order they were added."""
    return [spec for spec in task_specs.values() if spec.extends == base]


def merged_labels(task_specs: Mapping[str, TaskSpec], base: str) -> tuple[str, ...]:
    """The labels of ``base``'s merged map: its own, then each extension's new ones."""
    labels = list(task_specs[base].labels)
    for extension in extensions_of(task_specs, base):
        labels += extension.labels[1:]
    return tuple(labels)


def merge_label_maps(
    base: Tensor, extensions: Sequence[tuple[Tensor, int]], base_labels: int
) -> Tensor:
    """Merge the label maps of a task and its extensions (see the module doc).

    Parameters
    ----------
    base
        The base task's label map (integers ``0..base_labels - 1``).
    extensions
        Each extension's label map and its number of labels (background included), in the
        order they were added; every map has ``base``'s shape.
    base_labels
        The base task's number of labels (background included).

    Returns
    -------
    Tensor
        The merged map (``base``'s dtype): voxels the base gives a label keep it.

    Raises
    ------
    ValueError
        If an extension map's shape differs from ``base``'s.
    """
    merged = base.clone()
    offset = base_labels
    for labels, count in extensions:
        if labels.shape != base.shape:
            raise ValueError(
                f"extension label map of shape {tuple(labels.shape)} for a base map of shape "
                f"{tuple(base.shape)}"
            )
        claim = (merged == 0) & (labels > 0)
        merged[claim] = (labels[claim] + offset - 1).to(merged.dtype)
        offset += count - 1
    return merged


def predict_label_map(
    model: UniconModel,
    x: Tensor,
    *,
    modality: str,
    task: str,
    prompt: Tensor | None = None,
) -> Tensor:
    """The merged label map ``(B, *spatial)`` of segmentation task ``task`` on ``x``.

    Runs the task's route and each of its extensions' routes (``prompt`` goes to those that
    take one) and merges them with :func:`merge_label_maps`; a task without extensions gives
    its own argmax.
    """
    specs: Mapping[str, TaskSpec] = model.task_specs

    def labels_of(spec: TaskSpec) -> Tensor:
        extra = {"prompt": prompt} if spec.prompted and prompt is not None else {}
        return torch.as_tensor(model(x, modality=modality, task=spec.name, **extra)).argmax(1)

    base = specs[task]
    extensions = [(labels_of(spec), len(spec.labels)) for spec in extensions_of(specs, task)]
    return merge_label_maps(labels_of(base), extensions, len(base.labels))
