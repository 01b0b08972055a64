"""Box prompts on small lesions (issue 13, item 2): Dice with the label's box vs without.

Target: box-prompted Dice ≥ unprompted Dice + 0.10 on lesions < 1 cm³. :func:`bench_box_prompts`
trains the learning benchmark's segmentation stage alone (:func:`prompted_plan`: the lesion
segmentation task with ``prompt = "box"``, trained from scratch like the ``single-task``
baseline's stage) over the benchmark's generated sites, then predicts every test case of
every site twice, without a box (the whole image) and with the case's label bounding box
(:func:`unicon_model.prompts.label_prompt`, as the sites' ``dice_prompted``), and scores both
with :func:`score_box_prompts`:

- **all**: every test case with a lesion;
- **small_lesions**: the test cases whose every lesion is smaller than
  :data:`SMALL_LESION_CM3`. A lesion is a connected component (26-neighbourhood in 3D) of the
  case's foreground on the model's grid, its volume the voxel count times the voxel volume
  (the plan's ``data.spacing``, else the generator's :data:`simulations.synthetic.SPACING_MM`).

Dice is pooled case by case (per label the mean over the cases, then over the labels, as
:func:`unicon_model.metrics.segmentation.mean_dice_of_cases`), not per site. The
coordinator's own case-weighted figures of the run (``R`` and ``dice_prompted``) come along
as a cross-check.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import generate_binary_structure, label

from simulations.synthetic import SPACING_MM

logger = logging.getLogger(__name__)

__all__ = [
    "PROMPTED_TASK",
    "SMALL_LESION_CM3",
    "TARGET_GAIN",
    "bench_box_prompts",
    "lesion_volumes_cm3",
    "prompted_plan",
    "score_box_prompts",
    "voxel_volume_mm3",
]

SMALL_LESION_CM3 = 1.0
"""Lesions smaller than this (cm³) are "small" (the issue's target)."""

TARGET_GAIN = 0.10
"""The target: box-prompted Dice ≥ unprompted Dice + this, on the small lesions."""

PROMPTED_TASK = "lesion-seg"
"""The segmentation task of the learning benchmark's plan that gets ``prompt = "box"``."""


def voxel_volume_mm3(spacing: Sequence[float] | None, dims: int = 3) -> float:
    """The volume of one voxel of the model's grid (mm³).

    ``spacing`` is the plan's ``data.spacing``; ``None`` (native spacing) is the generator's
    :data:`simulations.synthetic.SPACING_MM` along each of ``dims`` axes.
    """
    return float(np.prod(spacing)) if spacing is not None else float(SPACING_MM**dims)


def lesion_volumes_cm3(target: np.ndarray, voxel_mm3: float) -> list[float]:
    """The volume (cm³) of each lesion of a label map: each connected foreground component.

    Foreground is every label above 0; components connect through faces, edges and corners
    (26-neighbourhood in 3D).
    """
    foreground = np.asarray(target) > 0
    components, count = label(
        foreground, structure=generate_binary_structure(foreground.ndim, foreground.ndim)
    )
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    return [float(s) * voxel_mm3 / 1000.0 for s in sizes]


def _pooled(
    plain: torch.Tensor, boxed: torch.Tensor, keep: np.ndarray, lesions: int
) -> dict[str, Any]:
    """Pooled Dice of the kept cases without and with the box, their gain and counts."""
    from unicon_model.metrics.segmentation import mean_dice_of_cases

    index = torch.from_numpy(np.flatnonzero(keep))
    cases = int(keep.sum())
    unprompted = mean_dice_of_cases(plain[index]) if cases else math.nan
    prompted = mean_dice_of_cases(boxed[index]) if cases else math.nan
    return {
        "unprompted": unprompted,
        "prompted": prompted,
        "gain": prompted - unprompted,
        "cases": cases,
        "lesions": lesions,
    }


def score_box_prompts(
    unprompted: Sequence[np.ndarray],
    prompted: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    num_labels: int,
    voxel_mm3: float,
    threshold_cm3: float = SMALL_LESION_CM3,
    target_gain: float = TARGET_GAIN,
) -> dict[str, Any]:
    """Dice without and with the box prompt, on all cases and on the small-lesion cases.

    Parameters
    ----------
    unprompted, prompted
        Each case's predicted label map without a box and with its label's box.
    targets
        Each case's label map (same shape as its predictions).
    num_labels
        Labels of the task, background included.
    voxel_mm3
        Volume of one voxel (:func:`voxel_volume_mm3`).
    threshold_cm3, target_gain
        A small-lesion case has every lesion below ``threshold_cm3``; the target is met when
        the small-lesion gain is at least ``target_gain``.

    Returns
    -------
    dict
        ``all`` and ``small_lesions``: ``unprompted``, ``prompted`` and ``gain`` (pooled Dice
        over the cases with a lesion; NaN without any), ``cases`` and ``lesions``;
        ``threshold_cm3``, ``target_gain``, ``met`` (False when the gain is NaN) and
        ``largest_lesion_cm3``.
    """
    from unicon_model.metrics.segmentation import dice_per_case

    if not targets or not len(unprompted) == len(prompted) == len(targets):
        raise ValueError(
            f"{len(unprompted)} unprompted and {len(prompted)} prompted prediction(s) for "
            f"{len(targets)} target(s): give one of each per case, at least one case"
        )
    target = torch.from_numpy(np.stack([np.asarray(t) for t in targets])).long()
    plain, boxed = (
        dice_per_case(torch.from_numpy(np.stack(p)).long(), target, num_labels=num_labels)
        for p in (unprompted, prompted)
    )
    volumes = [lesion_volumes_cm3(t, voxel_mm3) for t in targets]
    lesioned = np.array([bool(v) for v in volumes])
    small = np.array([bool(v) and max(v) < threshold_cm3 for v in volumes])
    every = _pooled(plain, boxed, lesioned, sum(len(v) for v in volumes))
    few = _pooled(plain, boxed, small, sum(len(volumes[i]) for i in np.flatnonzero(small)))
    return {
        "all": every,
        "small_lesions": few,
        "threshold_cm3": threshold_cm3,
        "target_gain": target_gain,
        "met": bool(math.isfinite(few["gain"]) and few["gain"] >= target_gain),
        "largest_lesion_cm3": max((max(v) for v in volumes if v), default=0.0),
    }


def prompted_plan(raw: Mapping[str, Any], task: str = PROMPTED_TASK) -> dict[str, Any]:
    """The stage of ``raw`` that adds ``task``, alone and from scratch, with ``prompt = "box"``.

    As the ``single-task`` baseline runs that stage
    (:func:`simulations.baseline_plans.single_task_plans`), named ``<plan>-box-prompts``.

    Raises
    ------
    ValueError
        If no stage after the first adds ``task``.
    """
    from simulations.baseline_plans import single_task_plans

    for index, single in single_task_plans(raw):
        added = raw["stages"][index].get("add_tasks", [])
        if any(t.get("name") == task for t in added):
            out = copy.deepcopy(single)
            for spec in out["stages"][0]["add_tasks"]:
                if spec["name"] == task:
                    spec["prompt"] = "box"
            out["name"] = f"{raw['name'][:50]}-box-prompts"
            return out
    raise ValueError(f"plan {raw['name']!r}: no stage after the first adds task {task!r}")


def _test_predictions(
    model: torch.nn.Module, raw: Mapping[str, Any], sites: Sequence[Path], task: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], int]:
    """Every site's test label maps without and with the box, the targets and the labels."""
    from client.data import build_dataset, label_key
    from client.manifest import load_manifest
    from client.site_folder import manifest_in
    from client.trainer import predict
    from unicon_model.schema import validate_plan

    plan = validate_plan(raw)
    spec = plan.tasks_until(0)[task]
    modality = plan.stages[0].add_modalities[0]
    plain: list[np.ndarray] = []
    boxed: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    device = torch.device("cpu")
    for folder in sites:
        manifest = load_manifest(manifest_in(folder))
        dataset = build_dataset(
            manifest, split="test", modality=modality, tasks={task: spec}, data=plan.data
        )
        outputs, batches = predict(model, dataset, spec, device=device)
        with_box, _ = predict(model, dataset, spec, device=device, boxed=True)
        if not batches:
            continue
        masks = torch.cat([b[label_key(task, "mask")] for b in batches]).numpy()
        for out, box_out, mask in zip(outputs, with_box, masks, strict=True):
            plain.append(out)
            boxed.append(box_out)
            targets.append(mask.reshape(out.shape))
    return plain, boxed, targets, spec.num_outputs


def bench_box_prompts(
    raw: Mapping[str, Any], sites: Sequence[Path], work: Path, task: str = PROMPTED_TASK
) -> dict[str, Any]:
    """Train :func:`prompted_plan` over ``sites`` and score its test cases; see the module doc.

    Returns
    -------
    dict
        :func:`score_box_prompts`'s figures plus ``route``, ``plan``, ``voxel_mm3``, ``wall_s``
        (training and scoring) and ``coordinator`` (the run's case-weighted ``dice`` and
        ``dice_prompted`` of each route after its stage, as the report shows them).
    """
    from simulations.baselines import Clock, final_model, run_federated

    plan = prompted_plan(raw, task)
    clock = Clock()
    result = run_federated("box-prompts", plan, sites, work, clock.elapsed)
    model = final_model(work / "box-prompts" / "registry", plan["name"])
    plain, boxed, targets, labels = _test_predictions(model, plan, sites, task)
    spacing = plan["data"].get("spacing")
    voxel = voxel_volume_mm3(spacing, dims=len(plan["data"]["patch_size"]))
    scores = score_box_prompts(plain, boxed, targets, num_labels=labels, voxel_mm3=voxel)
    prompted = result.dice_prompted[-1] if result.dice_prompted else []
    coordinator = {
        route: {"dice": dice, "dice_prompted": prompted[j] if j < len(prompted) else math.nan}
        for j, (route, dice) in enumerate(zip(result.tasks, result.R[-1], strict=True))
    }
    modality = plan["stages"][0]["add_modalities"][0]["name"]
    return {
        "route": f"{task}@{modality}",
        "plan": "the segmentation stage alone, from scratch, prompt = box",
        **scores,
        "voxel_mm3": voxel,
        "coordinator": coordinator,
        "wall_s": clock.elapsed(),
    }
