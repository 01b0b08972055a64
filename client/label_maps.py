"""Merged label maps of a segmentation task and its label extensions, over a dataset.

The evaluation of each route scores its own head (:func:`client.trainer.predict`); what a user
of a task with label extensions gets is the merged map over every label
(:mod:`unicon_model.label_extensions`). :func:`predict_merged` computes it for the labelled
cases of a dataset, so benchmarks and tests can score every label, earlier and new, as
``unicon predict`` returns them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from client.data import CaseDataset, label_key
from client.train_loop import to_device
from unicon_model.label_extensions import predict_label_map
from unicon_model.model import UniconModel

__all__ = ["predict_merged"]


def predict_merged(
    model: UniconModel,
    dataset: CaseDataset,
    task: str,
    *,
    device: torch.device | None = None,
    batch_size: int = 8,
) -> tuple[np.ndarray, Tensor]:
    """The merged label maps of ``task`` and their targets, on ``dataset``'s labelled cases.

    Parameters
    ----------
    model
        A model holding ``task`` (a segmentation task) and any of its extensions.
    dataset
        Built for ``task`` with its merged labels (e.g. a :class:`TaskSpec` copy whose
        ``labels`` are :func:`unicon_model.label_extensions.merged_labels`), so the targets
        carry every label.
    task
        The base task's name.

    Returns
    -------
    tuple
        ``(cases, *spatial)`` predicted label maps (NumPy) and the target maps (a tensor).
    """
    device = device or torch.device("cpu")
    model.to(device).eval()
    has, mask = label_key(task, "has"), label_key(task, "mask")
    outputs: list[np.ndarray] = []
    targets: list[Tensor] = []
    loader: DataLoader[dict[str, Tensor]] = DataLoader(dataset, batch_size=batch_size)
    with torch.no_grad():
        for raw in loader:
            keep = raw[has].bool()
            if not keep.any():
                continue
            batch = to_device({k: v[keep] for k, v in raw.items()}, device)
            labels = predict_label_map(model, batch["image"], modality=dataset.modality, task=task)
            outputs.append(labels.cpu().numpy())
            targets.append(batch[mask].long().cpu())
    if not outputs:
        return np.zeros((0,), dtype=np.int64), torch.zeros(0, dtype=torch.long)
    return np.concatenate(outputs), torch.cat(targets)
