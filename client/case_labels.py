"""A case's labels as tensors, one entry per task named by :func:`label_key`.

Classification labels become class indices, survival labels time, event and the scaled
clinical covariates, segmentation masks integer label maps; every task gets a ``has`` flag.
A segmentation mask's values are the labels the site's manifest declares for the task; they
are matched to the plan's labels by name (:func:`mask_lookup`), so a plan may learn some of
them first and add the others later (label extensions read the masks of the task they extend).
A label the plan does not allow raises :class:`client.errors.DataError` (the case is then
skipped by :func:`client.data.build_dataset`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from client.errors import DataError
from client.manifest import Case, SurvivalLabel
from unicon_model.schema import TaskSpec


def label_key(task: str, field_name: str) -> str:
    """Key of a per-task entry of a sample: ``<task>:label|time|event|mask|clinical|has``."""
    return f"{task}:{field_name}"


def mask_lookup(spec: TaskSpec, declared: Sequence[str] | None) -> np.ndarray | None:
    """How the site's mask values map to the plan task's label indices.

    Parameters
    ----------
    spec
        The plan's task (a label extension reads the masks of :attr:`TaskSpec.label_source`).
    declared
        The labels the site's manifest declares for that source task, in mask-value order;
        ``None`` if it declares none.

    Returns
    -------
    numpy.ndarray or None
        ``lookup[value]`` = the plan's label index; values whose label the plan does not (yet)
        learn map to 0 (background). ``None``: the mask values are the plan's indices as they
        are (the manifest declares the plan's labels, or as many labels none of which is named
        like a plan label after background, e.g. ``foreground`` for ``tumour``).

    Raises
    ------
    DataError
        If the plan needs labels the manifest does not declare (an extension matches by name
        only; a task some of whose labels match by name needs all of them), naming them and
        the fix.
    """
    wanted = list(spec.labels[1:])
    if declared is not None and list(declared) == list(spec.labels):
        return None
    missing = [label for label in wanted if declared is None or label not in declared]
    if declared is not None and not missing:
        lookup = np.zeros(len(declared), dtype=np.int64)
        for value, label in enumerate(declared):
            if label in wanted:
                lookup[value] = spec.labels.index(label)
        return lookup
    named_otherwise = declared is None or (
        len(declared) == len(spec.labels) and len(missing) == len(wanted)
    )
    if spec.extends is None and named_otherwise:
        return None  # no label named alike (e.g. 'foreground'): mask values are indices
    source = spec.label_source
    raise DataError(
        f"task {spec.name!r} needs labels {missing} of task {source!r}, but the site's "
        f"manifest declares {list(declared or [])} for it; add them to tasks.{source}.labels "
        "in the manifest (in the order of their mask values)"
    )


def encode_labels(
    case: Case,
    tasks: Mapping[str, TaskSpec],
    arrays: Mapping[str, np.ndarray],
    declared: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, torch.Tensor]:
    """The label entries of ``case`` for ``tasks`` (masks read from ``arrays``).

    ``declared``: the labels the site's manifest declares per segmentation task; masks are
    mapped to each plan task's labels through :func:`mask_lookup` (``None``: mask values
    are the plan's indices).

    Raises
    ------
    DataError
        A label outside the plan's classes, a survival label or covariate missing, a mask
        with values outside the task's labels, or labels the manifest does not declare.
    """
    sample: dict[str, torch.Tensor] = {}
    for name, spec in tasks.items():
        label = case.labels.get(spec.label_source)
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
                source = spec.label_source
                lookup = mask_lookup(spec, None if declared is None else declared.get(source))
                count = len(spec.labels) if lookup is None else len(lookup)
                if mask.min() < 0 or mask.max() >= count:
                    raise DataError(f"mask of task {source!r} has values outside 0..{count - 1}")
                if lookup is not None:
                    mask = lookup[mask]
            sample[label_key(name, "mask")] = torch.from_numpy(mask)
    return sample
