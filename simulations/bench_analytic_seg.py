"""Analytic vs gradient segmentation head on the same frozen features (issue 13, item 1).

Targets: the analytic (incremental ridge) head's Dice ≥ :data:`TARGET_RATIO` × the
gradient-trained head's on the same frozen features, in 1 round instead of N; and the upload
per site of the analytic stage (the statistics' size) next to the gradient head's total.

:func:`bench_analytic_seg` trains one frozen encoder (:func:`encoder_plan`: the stages of the
learning benchmark's plan before its segmentation stage that train the backbone or a
modality), or takes one already trained, then branches (:func:`branch_plan`): two one-stage
plans seeded from that encoder version (``[model.pretrained]``: backbone and modality
adapters), each adding the segmentation task with its backbone and adapters frozen:

- **analytic**: ``head = "analytic"`` (one round of summed ridge statistics, solved once);
- **gradient**: the plan's neural head trained for the plan's segmentation rounds,
  ``train = ["task/<task>"]``.

The analytic branch runs once per candidate of a small grid of head options
(:func:`simulations.bench_analytic_select.candidate_grid`: ``analytic_features`` × ``l2`` ×
``foreground_prior``); each candidate's head is scored on the sites' ``val`` splits
and the best validated one (:func:`simulations.bench_analytic_select.select_candidate`) is
the analytic figure: its test Dice is never used to choose.

Each branch reports its pooled test Dice (the coordinator's case-weighted ``R`` entry), its
rounds, wall seconds and the bytes each site uploaded (the run's ``bytes_up``); the analytic
one also the statistics' size (:func:`statistics_bytes`), its pooled val Dice and the whole
grid. ``frozen_max_abs_change`` checks that no branch moved the encoder.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from simulations.baseline_plans import drop_gradient_only_settings
from simulations.bench_only import print_figure_row, progress, write_only_results
from unicon_model.ridge import RidgeStatistics

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HEAD_OPTIONS",
    "SEG_TASK",
    "TARGET_RATIO",
    "analytic_seg_only",
    "analytic_seg_row",
    "bench_analytic_seg",
    "branch_plan",
    "dice_ratio",
    "encoder_plan",
    "encoder_pretrained",
    "encoder_version",
    "segmentation_stage",
    "statistics_bytes",
]

TARGET_RATIO = 0.9
"""The target: analytic Dice ≥ this × gradient Dice."""

SEG_TASK = "lesion-seg"
"""The segmentation task of the learning benchmark's plan both heads learn."""

DEFAULT_HEAD_OPTIONS: Mapping[str, Any] = {"class_balance": True}
"""Options of the analytic head (the README's defaults: class-balanced, no random features)."""


def dice_ratio(analytic: float, gradient: float, target: float = TARGET_RATIO) -> dict[str, Any]:
    """Analytic over gradient Dice and whether it meets ``target``.

    The ratio is NaN when either Dice is not finite or the gradient Dice is not positive;
    then ``met`` is false.
    """
    finite = math.isfinite(analytic) and math.isfinite(gradient) and gradient > 0
    ratio = analytic / gradient if finite else math.nan
    return {"ratio": ratio, "target": target, "met": bool(finite and ratio >= target)}


def statistics_bytes(shapes: Mapping[str, tuple[int, int]]) -> int:
    """Bytes of the ridge statistics a site sends for heads of ``(d, k)`` shapes.

    The arrays of :meth:`unicon_model.ridge.RidgeStatistics.to_arrays` (count, feature and
    target sums, Gram and cross terms), float64 as the sites send them.
    """
    return sum(
        int(a.nbytes)
        for d, k in shapes.values()
        for a in RidgeStatistics.zeros(d, k).to_arrays().values()
    )


def segmentation_stage(raw: Mapping[str, Any], task: str = SEG_TASK) -> int:
    """Index of the stage of ``raw`` that adds ``task``.

    Raises
    ------
    ValueError
        If no stage after the first adds it (the encoder needs a stage before it).
    """
    for index, stage in enumerate(raw["stages"]):
        if any(t.get("name") == task for t in stage.get("add_tasks", [])):
            if index == 0:
                break
            return index
    raise ValueError(f"plan {raw['name']!r}: no stage after the first adds task {task!r}")


def encoder_plan(raw: Mapping[str, Any], task: str = SEG_TASK) -> dict[str, Any]:
    """The stages of ``raw`` before its ``task`` stage that train the encoder, as a plan.

    Those whose trained components include the backbone or a modality adapter; the others
    (e.g. a head-only prognosis stage) leave the features unchanged. Named
    ``<plan>-seg-encoder``.
    """
    from unicon_model.schema import validate_plan

    index = segmentation_stage(raw, task)
    plan = validate_plan(raw)
    keep = [
        i
        for i, stage in enumerate(plan.stages[:index])
        if any(c == "backbone" or c.startswith("modality/") for c in stage.trained_components)
    ]
    out = copy.deepcopy(dict(raw))
    out["stages"] = [copy.deepcopy(raw["stages"][i]) for i in keep]
    out["name"] = f"{raw['name'][:40]}-seg-encoder"
    return out


def encoder_pretrained(encoder: Path, components: Sequence[str]) -> dict[str, Any]:
    """``[model.pretrained]`` seeding ``components`` from the registry version ``encoder``.

    When the version's component files are there, their tensors are written to one
    ``.safetensors`` file beside the registry (``<registry parent>/<version>-encoder
    .safetensors``) and the spec pins its sha256: the run's identity, and so the sites'
    seeds, then depend on the weights alone, not on the (temporary) folder nor on the
    version's creation time, so a benchmark that trains the same encoder again repeats.
    Otherwise the version folder itself (format ``unicon``, unpinned).
    """
    pinned = _pinned_weights(encoder, tuple(components))
    if pinned is None:
        return {"path": str(encoder), "format": "unicon", "components": list(components)}
    path, sha256 = pinned
    return {
        "path": path,
        "format": "safetensors",
        "components": list(components),
        "sha256": sha256,
    }


@functools.lru_cache(maxsize=8)
def _pinned_weights(encoder: Path, components: tuple[str, ...]) -> tuple[str, str] | None:
    """The one-file copy of ``components`` of the version ``encoder`` and its sha256, written
    once per version (every branch of a benchmark seeds from it); ``None`` when a component
    file is missing. Registry versions are never rewritten, so the copy stays valid."""
    from safetensors.torch import load_file, save

    from unicon_model.checkpoint import component_file_name

    files = [encoder / component_file_name(c) for c in components]
    if not all(f.is_file() for f in files):
        return None
    tensors = {}
    for file in files:
        tensors.update(load_file(file))
    data = save(dict(sorted(tensors.items())))
    target = encoder.parent.parent.parent / f"{encoder.name}-encoder.safetensors"
    target.write_bytes(data)
    return str(target), hashlib.sha256(data).hexdigest()


def branch_plan(
    raw: Mapping[str, Any],
    encoder: Path,
    *,
    analytic: bool,
    head_options: Mapping[str, Any] = DEFAULT_HEAD_OPTIONS,
    task: str = SEG_TASK,
) -> dict[str, Any]:
    """``raw``'s ``task`` stage alone, on the frozen encoder of the version folder ``encoder``.

    The stage re-adds the modalities of the earlier stages (same specs), seeded with the
    backbone from ``encoder`` (``[model.pretrained]``: backbone and those adapters) and
    trains only ``task/<task>``: by gradient for its rounds (``analytic`` false; with the
    task's encoder deltas, if any), or as an analytic head (``head = "analytic"`` plus
    ``head_options``, without deltas or prompting) in one round. Named
    ``<plan>-seg-analytic`` or ``<plan>-seg-gradient``.
    """
    index = segmentation_stage(raw, task)
    modalities = [
        copy.deepcopy(m) for s in raw["stages"][:index] for m in s.get("add_modalities", [])
    ]
    stage = copy.deepcopy(raw["stages"][index])
    spec = copy.deepcopy(next(t for t in stage["add_tasks"] if t["name"] == task))
    if analytic:
        drop_gradient_only_settings(spec)
        spec.update({"head": "analytic", **head_options})
    stage.update(
        {
            "add_modalities": modalities,
            "add_tasks": [spec],
            "objectives": [],
            "modalities": [],
            "train": [] if analytic else [f"task/{task}"],
            "rounds": 1 if analytic else stage["rounds"],
            "regularisers": [],
        }
    )
    out = copy.deepcopy(dict(raw))
    components = ["backbone", *(f"modality/{m['name']}" for m in modalities)]
    out["model"]["pretrained"] = encoder_pretrained(encoder, components)
    out["stages"] = [stage]
    out["name"] = f"{raw['name'][:40]}-seg-{'analytic' if analytic else 'gradient'}"
    return out


def encoder_version(registry_root: Path, plan_name: str, before: str | None = None) -> Path:
    """The version folder of the last stage ``plan_name`` completed in a registry (before
    the stage named ``before``, if given): the encoder to branch from.

    Raises
    ------
    BaselineError
        If no registry is there or no such stage completed.
    """
    from server.registry import Registry
    from simulations.baselines import BaselineError

    if not (registry_root / "versions").is_dir():
        raise BaselineError(f"{registry_root}: no registry there")
    registry = Registry(registry_root)
    completed = registry.progress(plan_name).completed
    names = [c.stage for c in completed]
    if before is not None and before in names:
        completed = completed[: names.index(before)]
    if not completed:
        raise BaselineError(
            f"{registry_root}: plan {plan_name!r} completed no stage to branch from"
        )
    return registry.version_dir(completed[-1].version)


def _branch(
    name: str, plan: dict[str, Any], sites: Sequence[Path], work: Path, task: str
) -> dict[str, Any]:
    """Run one branch; its Dice, rounds, wall seconds and upload per site.

    ``val_dice``: the route's pooled val Dice of the last validated round (a gradient
    branch's own validation; NaN when no round was validated, as in an analytic stage).
    """
    from simulations.baselines import Clock, run_federated

    clock = Clock()
    result = run_federated(name, plan, sites, work, clock.elapsed)
    route = next(t for t in result.tasks if t.startswith(f"{task}@"))
    per_site = {site: int(b) for site, b in sorted(result.bytes_up.items())}
    validated = [r["val"] for r in result.rounds if isinstance(r.get("val"), dict)]
    val = (validated[-1].get("case_weighted_mean") or {}).get(route) if validated else None
    return {
        "route": route,
        "dice": float(result.R[-1][result.tasks.index(route)]),
        "val_dice": float(val) if val is not None else math.nan,
        "rounds": len(result.rounds),
        "wall_s": clock.elapsed(),
        "bytes_up_per_site": per_site,
        "bytes_up_mean": sum(per_site.values()) / max(len(per_site), 1),
    }


def _candidate(
    name: str, plan: dict[str, Any], sites: Sequence[Path], work: Path, task: str
) -> dict[str, Any]:
    """One analytic candidate: :func:`_branch`'s figures, its val Dice
    (:func:`simulations.bench_analytic_select.validation_dice`, timed in ``val_s``) and its
    statistics' shape and size."""
    from simulations.baselines import Clock
    from simulations.bench_analytic_select import validation_dice

    figures = _branch(name, plan, sites, work, task)
    clock = Clock()
    figures["val_dice"] = validation_dice(plan, sites, work / name, figures["route"])
    shape = _statistics_shape(plan, work / name / "registry", task)
    figures.update(
        val_s=clock.elapsed(),
        statistics_shape=list(shape),
        statistics_bytes=statistics_bytes({task: shape}),
    )
    return figures


def _frozen_change(encoder: Path, work: Path, plans: Mapping[str, Mapping[str, Any]]) -> float:
    """Largest absolute change of the seeded components between the encoder version and
    each branch's final model (0 when every branch kept the encoder frozen)."""
    from server.registry import Registry
    from simulations.baselines import final_model
    from unicon_model.components import select_state

    base, _ = Registry(encoder.parent.parent).load(encoder.name)
    change = 0.0
    for name, plan in plans.items():
        components = plan["model"]["pretrained"]["components"]
        before = select_state(base, components)
        after = select_state(final_model(work / name / "registry", plan["name"]), components)
        for key, value in before.items():
            change = max(change, float((after[key].double() - value.double()).abs().max()))
    return change


def bench_analytic_seg(
    raw: Mapping[str, Any],
    sites: Sequence[Path],
    work: Path,
    *,
    candidates: Sequence[Mapping[str, Any]] | None = None,
    encoder: Path | None = None,
    task: str = SEG_TASK,
) -> dict[str, Any]:
    """Both heads on one frozen encoder over ``sites``; see the module doc.

    ``candidates``: the analytic head's options to choose from on the val splits (default
    :func:`simulations.bench_analytic_select.candidate_grid`). ``encoder``: a registry
    version folder to branch from; ``None`` trains :func:`encoder_plan` under
    ``work/seg-encoder`` first.

    Returns
    -------
    dict
        ``analytic`` (the chosen candidate: :func:`_branch`'s figures plus ``val_dice``,
        ``val_s``, ``statistics_bytes`` and ``statistics_shape``) and ``gradient``
        (:func:`_branch`'s), ``ratio``, ``target``, ``met`` (:func:`dice_ratio` of their test
        Dice), ``head_options`` (the chosen ones), ``grid`` (every candidate's
        ``head_options``, ``name``, ``val_dice``, ``dice``, ``wall_s``, ``val_s`` and
        ``statistics_bytes``), ``selected_by`` (``"val_dice"``), ``encoder`` (``stages``
        and ``wall_s``, or the version given) and ``frozen_max_abs_change``.

    Raises
    ------
    ValueError
        If ``candidates`` is empty or no candidate has a finite val Dice.
    """
    from simulations.baselines import Clock, run_federated
    from simulations.bench_analytic_incremental import bench_incremental
    from simulations.bench_analytic_select import (
        CANDIDATE_FEATURES,
        CANDIDATE_L2,
        candidate_grid,
        candidate_name,
        select_candidate,
    )

    grid_options = candidate_grid(features=CANDIDATE_FEATURES, l2=CANDIDATE_L2)
    options = [dict(c) for c in (grid_options if candidates is None else candidates)]
    if not options:
        raise ValueError("no analytic head candidates to choose from")
    encoder_info: dict[str, Any] = {"version": str(encoder)} if encoder else {}
    if encoder is None:
        base = encoder_plan(raw, task)
        clock = Clock()
        run_federated("seg-encoder", base, sites, work, clock.elapsed)
        encoder = encoder_version(work / "seg-encoder" / "registry", base["name"])
        encoder_info = {"stages": [s["name"] for s in base["stages"]], "wall_s": clock.elapsed()}
    names = [candidate_name(o) for o in options]
    if len(set(names)) != len(names):
        raise ValueError(f"analytic head candidates repeat: {names}")
    # the gradient branch first: its figure does not depend on how many candidates ran
    plans = {"seg-gradient": branch_plan(raw, encoder, analytic=False, task=task)}
    gradient = _branch("seg-gradient", plans["seg-gradient"], sites, work, task)
    progress(f"seg-gradient: test Dice {gradient['dice']:.4f}, {gradient['wall_s']:.1f} s")
    grid: list[dict[str, Any]] = []
    for name, head in zip(names, options, strict=True):
        plans[name] = branch_plan(raw, encoder, analytic=True, head_options=head, task=task)
        figures = _candidate(name, plans[name], sites, work, task)
        grid.append({"name": name, "head_options": head, **figures})
        progress(
            f"{name}: val Dice {figures['val_dice']:.4f}, test Dice {figures['dice']:.4f}, "
            f"run {figures['wall_s']:.1f} s + val {figures['val_s']:.1f} s"
        )
    chosen = select_candidate(grid)
    if chosen is None:
        raise ValueError(f"no analytic head candidate has a finite val Dice: {names}")
    analytic = {k: v for k, v in grid[chosen].items() if k not in ("name", "head_options")}
    chosen_name = grid[chosen]["name"]
    progress(f"{chosen_name}: again as one stage per hospital (incremental updates) …")
    incremental = bench_incremental(
        plans[chosen_name], sites, work, work / chosen_name / "registry", task
    )
    keep = ("name", "head_options", "val_dice", "dice", "wall_s", "val_s", "statistics_bytes")
    return {
        "analytic": analytic,
        "gradient": gradient,
        **dice_ratio(analytic["dice"], gradient["dice"]),
        "head_options": grid[chosen]["head_options"],
        "selected": grid[chosen]["name"],
        "selected_by": "val_dice",
        "grid": [{k: row[k] for k in keep} for row in grid],
        "encoder": encoder_info,
        "frozen_max_abs_change": _frozen_change(encoder, work, plans),
        "incremental": incremental,
    }


def _statistics_shape(plan: Mapping[str, Any], registry_root: Path, task: str) -> tuple[int, int]:
    """``(d, k)`` of the analytic branch's statistics
    (:func:`server.rounds.analytic.statistics_shapes` of its stage and final model)."""
    from server.rounds.analytic import statistics_shapes
    from simulations.baselines import final_model
    from unicon_model.schema import validate_plan

    model = final_model(registry_root, plan["name"])
    return statistics_shapes(model, validate_plan(plan).stages[0])[task]


def analytic_seg_row(entry: Any) -> tuple[str, str]:
    """The table row of :func:`bench_analytic_seg`'s figures (with the candidates chosen
    from, when the entry has a ``grid``)."""
    title = "analytic vs gradient segmentation head, same frozen features"
    if not isinstance(entry, dict) or "analytic" not in entry:
        error = entry.get("error") if isinstance(entry, dict) else entry
        return title, f"not computed: {error}"
    a, g = entry["analytic"], entry["gradient"]
    figure = (
        f"Dice {a['dice']:.3f} vs {g['dice']:.3f} = ×{entry['ratio']:.3f} (target "
        f"×{entry['target']:g}: {'met' if entry['met'] else 'not met'}) in {a['rounds']} vs "
        f"{g['rounds']} rounds, {a['wall_s']:.0f} s vs {g['wall_s']:.0f} s; upload per site "
        f"{a['bytes_up_mean']:,.0f} B (statistics {a['statistics_bytes']:,} B) vs "
        f"{g['bytes_up_mean']:,.0f} B"
    )
    if entry.get("grid"):
        from simulations.bench_analytic_select import grid_text

        figure += f"; {grid_text(entry)}"
    incremental = entry.get("incremental")
    if isinstance(incremental, dict) and "max_abs_difference" in incremental:
        figure += (
            f"; one hospital per stage ({incremental['stages']} stages, update_analytic) vs one "
            f"stage: max |Δw| {incremental['max_abs_difference']:.1e} (target "
            f"{incremental['target']:g}: {'met' if incremental['met'] else 'not met'}), Dice "
            f"{incremental['dice']:.3f} vs {incremental['reference_dice']:.3f}"
        )
    return f"{title}, {a['route']}", figure


def analytic_seg_only(
    out: Path, *, quick: bool, candidates: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """``--only analytic-seg``: this benchmark alone on the learning scenario's sites.

    ``candidates``: as :func:`bench_analytic_seg`'s. Writes ``out/results.json`` as
    ``{"analytic_seg": {..., "scenario": ...}}`` and prints its row (in ``make bench`` the
    same figures are ``learning.analytic_seg``).
    """
    from simulations.bench_learning import learning_scenario

    with tempfile.TemporaryDirectory() as tmp:
        sites, raw, scenario = learning_scenario(Path(tmp), quick=quick)
        figures = bench_analytic_seg(raw, sites, Path(tmp), candidates=candidates)
        entry = {**figures, "scenario": scenario}
    write_only_results(out, "analytic_seg", entry)
    title = f"analytic segmentation head ({scenario}, in-process)"
    print_figure_row(title, analytic_seg_row(entry))
    return entry
