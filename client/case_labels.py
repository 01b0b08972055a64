"""A case's labels as tensors, one entry per task named by :func:`label_key`.

Classification labels become class indices, survival labels time, event and the scaled
clinical covariates, segmentation masks integer label maps; every task gets a ``has`` flag.
A label the plan does not allow raises :class:`client.errors.DataError` (the case is then
skipped by :func:`client.data.build_dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from client.errors import DataError
from client.manifest import Case, SurvivalLabel
from unicon_model.schema import TaskSpec


def label_key(task: str, field_name: str) -> str:
    """Key of a per-task entry of a sample: ``<task>:label|time|event|mask|clinical|has``."""
    return f"{task}:{field_name}"


def encode_labels(
    case: Case, tasks: Mapping[str, TaskSpec], arrays: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """The label entries of ``case`` for ``tasks`` (masks read from ``arrays``).

    Raises
    ------
    DataError
        A label outside the plan's classes, a survival label or covariate missing, or a mask
        with values outside the task's labels.
    """
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
