"""Labels added to an existing segmentation task (issue 13, item 3), measured.

Target: adding a new label changes every earlier label's Dice by at most
:data:`simulations.bench_structures.TARGET_MAX_CHANGE` (analytic: exactly 0).
:func:`bench_label_extension` runs ``examples/plans/organ_labels_added.toml`` (an organ stage
that learns the liver and the lungs, then a stage that adds the spine to the same task as a
label extension) over generated sites three times, one run each:

- **gradient**: the example as written, its extension (decoder and low-rank encoder deltas)
  trained by gradient on the frozen organ stage;
- **analytic**: the extension as ``head = "analytic"`` (with :data:`ANALYTIC_OPTIONS`), fitted
  in one round of summed ridge statistics on the same frozen encoder (nothing else changes);
- **joint**: the reference a user would otherwise pick, the organ task learning all three
  labels from the start (the organ stage alone, with the spine in its labels, same rounds).

Each earlier label's (liver, lungs) pooled test Dice is taken from the merged label map
(:func:`client.label_maps.predict_merged`, what ``unicon predict`` returns) after the organ
stage and after the spine stage, and :func:`simulations.bench_structures.label_changes` gives
the change; the spine's Dice comes from the merged map after the spine stage, next to the joint
run's. Pooled Dice: the mean over every site's test cases of the case's Dice, cases lacking
the label left out (:func:`simulations.bench_structures.pooled_label_dice`).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.baseline_plans import ANALYTIC_SEGMENTATION
from simulations.bench_only import print_figure_row, write_only_results
from simulations.bench_structures import (
    TARGET_MAX_CHANGE,
    example_on_learning_sites,
    label_changes,
    pooled_label_dice,
    sized_example,
    stage_seconds,
)

__all__ = [
    "EXAMPLE_PLAN",
    "analytic_extension_plan",
    "bench_label_extension",
    "joint_plan",
    "label_extension_gain",
    "label_extension_only",
    "label_extension_plan",
    "label_extension_row",
]

EXAMPLE_PLAN = (
    Path(__file__).resolve().parents[1] / "examples" / "plans" / "organ_labels_added.toml"
)
"""The liver and lungs → spine plan."""

BASE_TASK = "organ-seg"
"""The task the spine is added to."""


def label_extension_plan(
    *,
    patch_size: int | None = None,
    model: Mapping[str, Any] | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """:data:`EXAMPLE_PLAN` as a dict, with the given sizes in place of the example's
    (:func:`simulations.bench_structures.sized_example`)."""
    return sized_example(
        EXAMPLE_PLAN,
        patch_size=patch_size,
        model=model,
        rounds=rounds,
        local_epochs=local_epochs,
        min_sites=min_sites,
    )


def _extension(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The extension's task table of ``raw`` (the first task of the second stage)."""
    extension: dict[str, Any] = raw["stages"][1]["add_tasks"][0]
    return extension


ANALYTIC_OPTIONS: dict[str, Any] = {
    key: ANALYTIC_SEGMENTATION[key] for key in ("analytic_features", "l2")
}
"""The analytic extension's head options: those the analytic-seg benchmark chose on the val
splits for lesions (:mod:`simulations.bench_analytic_seg`), not tuned on this task."""


def analytic_extension_plan(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with its extension fitted analytically (one round, nothing trained), with
    :data:`ANALYTIC_OPTIONS`."""
    out = copy.deepcopy(dict(raw))
    _extension(out).update(head="analytic", lora_rank=0, **copy.deepcopy(ANALYTIC_OPTIONS))
    out["stages"][1].update(rounds=1, train=[])
    out["name"] = f"{raw['name'][:50]}-analytic"
    return out


def joint_plan(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw``'s organ stage alone, its task learning the extension's labels too."""
    out = copy.deepcopy(dict(raw))
    new = list(_extension(raw)["labels"][1:])
    organ = out["stages"][0]["add_tasks"][0]
    organ["labels"] = [*organ["labels"], *new]
    organ["foreground_prior"] = min(
        0.5, organ.get("foreground_prior", 0.01) + _extension(raw).get("foreground_prior", 0.01)
    )
    out["stages"] = out["stages"][:1]
    out["name"] = f"{raw['name'][:50]}-joint"
    return out


def _merged_test_maps(
    model: torch.nn.Module, raw: Mapping[str, Any], sites: Sequence[Path], labels: Sequence[str]
) -> tuple[np.ndarray, torch.Tensor]:
    """Every site's merged test label maps of the base task, and targets over ``labels``."""
    from client.data import build_dataset
    from client.label_maps import predict_merged
    from client.manifest import load_manifest
    from client.site_folder import manifest_in
    from unicon_model.model import UniconModel
    from unicon_model.schema import validate_plan

    assert isinstance(model, UniconModel)
    plan = validate_plan(raw)
    full = plan.tasks_until(0)[BASE_TASK].model_copy(update={"labels": tuple(labels)})
    outputs, targets = [], []
    for folder in sites:
        dataset = build_dataset(
            load_manifest(manifest_in(folder)),
            split="test",
            modality=plan.stages[0].add_modalities[0],
            tasks={BASE_TASK: full},
            data=plan.data,
        )
        out, target = predict_merged(model, dataset, BASE_TASK)
        if len(out):
            outputs.append(out)
            targets.append(target)
    if not outputs:
        raise ValueError(f"no site has a test case labelled for {BASE_TASK!r}")
    return np.concatenate(outputs), torch.cat(targets)


def _pooled(
    pred: np.ndarray, target: torch.Tensor, labels: Sequence[str], names: Sequence[str]
) -> dict[str, float]:
    """Pooled Dice of ``names`` (labels after background) from label maps over ``labels``."""
    from unicon_model.metrics.segmentation import dice_per_case

    per_case = dice_per_case(torch.from_numpy(pred).long(), target, num_labels=len(labels))
    dice = pooled_label_dice(per_case, list(labels[1:]))
    return {name: dice[name] for name in names}


def _run(name: str, raw: dict[str, Any], sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Run one variant; each label's pooled test Dice after every stage, and seconds."""
    from simulations.baseline_runs import federate
    from simulations.baselines import Clock
    from unicon_model.label_extensions import merged_labels

    clock = Clock()
    registry = federate(raw, sites, work / name)
    completed = registry.progress(raw["name"]).completed
    if len(completed) != len(raw["stages"]):
        raise ValueError(f"{name}: {len(completed)} of {len(raw['stages'])} stages completed")
    models = [registry.load(c.version)[0] for c in completed]
    final = merged_labels(models[-1].task_specs, BASE_TASK)
    maps = [_merged_test_maps(m, raw, sites, final) for m in models]
    target = maps[0][1]
    if any(not torch.equal(t, target) for _, t in maps):
        raise ValueError(f"{name}: the targets differ between the stages' predictions")
    dice = [
        _pooled(pred, target, final, merged_labels(m.task_specs, BASE_TASK)[1:])
        for m, (pred, _) in zip(models, maps, strict=True)
    ]
    stage_s = stage_seconds(registry, raw)
    figures: dict[str, Any] = {
        "dice_per_stage": dice,
        "test_cases": len(target),
        "stage_s": stage_s,
        "wall_s": clock.elapsed(),
    }
    if len(models) > 1:
        before, after = dice[0], {label: dice[1][label] for label in dice[0]}
        organ_voxels = maps[0][0] > 0
        figures.update(
            **label_changes(before, after),
            earlier_voxels_identical=bool(
                np.array_equal(maps[1][0][organ_voxels], maps[0][0][organ_voxels])
            ),
            new_labels={k: v for k, v in dice[1].items() if k not in before},
        )
    return figures


def bench_label_extension(
    raw: Mapping[str, Any], sites: Sequence[Path], work: Path
) -> dict[str, Any]:
    """The three runs of the module doc over ``sites``.

    Returns
    -------
    dict
        ``gradient`` and ``analytic``: each label's pooled test Dice after each stage
        (``dice_per_stage``), :func:`label_changes`'s figures for the earlier labels,
        ``earlier_voxels_identical`` and the new labels' Dice (``new_labels``); ``joint``:
        every label's Dice when learned together; ``met`` (both within the target and the
        analytic change exactly 0), the plan's sizes and ``wall_s``.
    """
    from simulations.baselines import Clock

    clock = Clock()
    gradient_raw = copy.deepcopy(dict(raw))
    gradient_raw["name"] = f"{raw['name'][:50]}-gradient"
    gradient = _run("gradient", gradient_raw, sites, work)
    analytic = _run("analytic", analytic_extension_plan(raw), sites, work)
    joint = _run("joint", joint_plan(raw), sites, work)
    stages = raw["stages"]
    return {
        "labels": {
            "earlier": list(stages[0]["add_tasks"][0]["labels"][1:]),
            "added": list(_extension(raw)["labels"][1:]),
        },
        "target_max_abs_change": TARGET_MAX_CHANGE,
        "gradient": gradient,
        "analytic": analytic,
        "joint": joint,
        "met": bool(gradient["met"] and analytic["met"] and analytic["exact"]),
        "plan": {
            "name": raw["name"],
            "patch_size": list(raw["data"]["patch_size"]),
            "widths": list(raw["model"]["widths"]),
            "rounds": [s.get("rounds") for s in stages],
            "sites": len(sites),
        },
        "wall_s": clock.elapsed(),
    }


def label_extension_gain(work: Path, *, quick: bool) -> dict[str, Any]:
    """:func:`bench_label_extension` on the learning scenario's sites at its patch size
    (:func:`simulations.bench_structures.example_on_learning_sites`); ``{"error": why}`` if
    it cannot run."""
    return example_on_learning_sites(
        work,
        quick=quick,
        example=EXAMPLE_PLAN,
        plan=label_extension_plan,
        bench=bench_label_extension,
        name="label-extension",
        what="new labels in an existing task (spine added to organ-seg)",
    )


def label_extension_row(entry: Any) -> tuple[str, str]:
    """The table row of :func:`bench_label_extension`'s figures."""
    title = "new labels in an existing task: earlier labels' Dice across the stage"
    if not isinstance(entry, dict) or "gradient" not in entry:
        error = entry.get("error") if isinstance(entry, dict) else entry
        return title, f"not computed: {error}"
    parts = []
    for name in ("gradient", "analytic"):
        v = entry[name]
        dice = ", ".join(f"{k} {d:.3f}" for k, d in v["dice_per_stage"][-1].items())
        parts.append(
            f"{name} extension: max |Δ| {v['max_abs_change']:.2e}"
            f"{' (exact)' if v['exact'] else ''} ({dice})"
        )
    joint = ", ".join(f"{k} {d:.3f}" for k, d in entry["joint"]["dice_per_stage"][-1].items())
    verdict = "met" if entry["met"] else "not met"
    target = f"target ≤ {entry['target_max_abs_change']:g}, analytic 0: {verdict}"
    return title, "; ".join(parts) + f"; all labels learned together: {joint}; {target}"


def label_extension_only(out: Path, *, quick: bool) -> dict[str, Any]:
    """``--only new-labels``: this benchmark alone on the learning scenario's sites.

    Writes ``out/results.json`` as ``{"new_labels": {...}}`` and prints its row (in
    ``make bench`` the same figures are ``learning.new_labels``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        entry = label_extension_gain(Path(tmp), quick=quick)
    write_only_results(out, "new_labels", entry)
    title = f"new labels ({entry.get('scenario', 'not run')}, in-process)"
    print_figure_row(title, label_extension_row(entry))
    return entry
