"""New structures without forgetting (issue 13, item 3): earlier labels' Dice across a stage.

Target: adding a new label or structure stage changes every earlier label's Dice by at most
:data:`TARGET_MAX_CHANGE` (with an analytic head: exactly 0). :func:`bench_new_structures`
runs ``examples/plans/organ_then_lesion.toml`` (:func:`structures_plan`: an organ stage, then a
lesion stage that trains only its own head and low-rank encoder deltas) over generated sites
twice:

- **gradient**: the example as written, its organ head trained by gradient with the encoder;
- **analytic**: the organ task as ``head = "analytic"`` (:func:`analytic_plan`). An analytic
  stage trains nothing by gradient (plan check: ``rounds = 1``, ``train`` empty), so its head
  needs a trained encoder to be worth fitting; the smallest honest one is the encoder the
  gradient variant's organ stage trained, seeded by ``[model.pretrained]`` (backbone and CT
  adapters, frozen). The organ stage then fits the ridge head in one round of summed
  statistics and the lesion stage is the example's. Its seconds leave out that encoder's
  training (counted in the gradient variant's).

For each variant, every site's test cases are predicted with the organ stage's model and with
the lesion stage's; each earlier label's (liver, lungs, spine) pooled test Dice is the mean
over all test cases of the case's Dice (:func:`unicon_model.metrics.segmentation.dice_per_case`,
cases lacking the label left out), and :func:`label_changes` gives the change per label and
the largest one. The lesion task's pooled Dice (mean over labels of the per-label case means,
:func:`unicon_model.metrics.segmentation.mean_dice_of_cases`) and the coordinator's own ``R``
entries come along.

In ``make bench`` (:func:`new_structures_gain`) the sites are the learning scenario's (quick:
3 hospitals of 16³) and the plan is the example at the scenario's patch size, with the
example's own model and rounds (about a minute for both variants on 2 cores at 16³).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.bench_analytic_seg import encoder_pretrained
from simulations.bench_only import print_figure_row, progress, write_only_results

logger = logging.getLogger(__name__)

__all__ = [
    "EXAMPLE_PLAN",
    "LESION_TASK",
    "ORGAN_TASK",
    "TARGET_MAX_CHANGE",
    "analytic_plan",
    "bench_new_structures",
    "example_on_learning_sites",
    "label_changes",
    "new_structures_gain",
    "new_structures_only",
    "new_structures_row",
    "pooled_label_dice",
    "sized_example",
    "stage_seconds",
    "structures_plan",
]

EXAMPLE_PLAN = Path(__file__).resolve().parents[1] / "examples" / "plans" / "organ_then_lesion.toml"
"""The organ → lesion plan both variants run."""

ORGAN_TASK = "organ-seg"
"""The earlier task: background, liver, lungs, spine."""

LESION_TASK = "lesion-seg"
"""The task the later stage adds."""

TARGET_MAX_CHANGE = 0.005
"""The target: no earlier label's pooled Dice moves by more than this."""


def sized_example(
    path: Path,
    *,
    patch_size: int | None = None,
    model: Mapping[str, Any] | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """The example plan at ``path`` as a dict, with the given sizes in place of its own.

    ``patch_size`` (an edge, all axes alike), ``model`` (replaces ``[model]``), and per stage
    ``rounds``, ``local_epochs`` and ``min_sites``; ``None`` keeps the example's value.
    """
    raw: dict[str, Any] = tomllib.loads(path.read_text())
    if patch_size is not None:
        raw["data"]["patch_size"] = [patch_size] * len(raw["data"]["patch_size"])
    if model is not None:
        raw["model"] = dict(model)
    settings = {"rounds": rounds, "local_epochs": local_epochs, "min_sites": min_sites}
    for stage in raw["stages"]:
        stage.update({k: v for k, v in settings.items() if v is not None})
    return raw


def structures_plan(
    *,
    patch_size: int | None = None,
    model: Mapping[str, Any] | None = None,
    rounds: int | None = None,
    local_epochs: int | None = None,
    min_sites: int | None = None,
) -> dict[str, Any]:
    """:data:`EXAMPLE_PLAN` as a dict, with the given sizes in place of the example's
    (:func:`sized_example`)."""
    return sized_example(
        EXAMPLE_PLAN,
        patch_size=patch_size,
        model=model,
        rounds=rounds,
        local_epochs=local_epochs,
        min_sites=min_sites,
    )


def analytic_plan(raw: Mapping[str, Any], encoder: Path) -> dict[str, Any]:
    """``raw`` with its organ task as an analytic head on the frozen encoder of ``encoder``.

    The organ stage keeps its modality and task but fits the head in closed form (one round,
    nothing trained by gradient); ``[model.pretrained]`` seeds the backbone and that stage's
    modality adapters from the registry version folder ``encoder``. Later stages unchanged.
    Named ``<plan>-analytic``.
    """
    out = copy.deepcopy(dict(raw))
    first = out["stages"][0]
    for spec in first["add_tasks"]:
        if spec["name"] == ORGAN_TASK:
            spec["head"] = "analytic"
    first.update({"train": [], "rounds": 1})
    modalities = [f"modality/{m['name']}" for m in first.get("add_modalities", [])]
    out["model"] = {
        **out["model"],
        "pretrained": encoder_pretrained(encoder, ["backbone", *modalities]),
    }
    out["name"] = f"{raw['name'][:50]}-analytic"
    return out


def pooled_label_dice(per_case: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
    """Each label's pooled Dice: the mean over cases of :func:`dice_per_case`'s scores.

    ``per_case`` is ``(cases, labels)`` without background, NaN where a case lacks the label
    (left out); a label no case has is NaN.
    """
    if per_case.ndim != 2 or per_case.shape[1] != len(labels):
        raise ValueError(
            f"per-case Dice of shape {tuple(per_case.shape)} for {len(labels)} label(s) "
            f"{list(labels)}: expected (cases, {len(labels)})"
        )
    means = torch.nanmean(per_case.double(), dim=0)
    return {label: float(v) for label, v in zip(labels, means, strict=True)}


def label_changes(
    before: Mapping[str, float],
    after: Mapping[str, float],
    target: float = TARGET_MAX_CHANGE,
) -> dict[str, Any]:
    """How much each label's Dice moved from ``before`` to ``after``.

    Returns
    -------
    dict
        ``change`` (label -> after - before; NaN where either is NaN), ``max_abs_change``
        (NaN if any change is), ``exact`` (every label's Dice the same value), ``target``
        and ``met`` (``max_abs_change <= target``; false when NaN).

    Raises
    ------
    ValueError
        If the two name different labels.
    """
    if list(before) != list(after):
        raise ValueError(f"labels differ: {list(before)} before, {list(after)} after")
    change = {label: after[label] - before[label] for label in before}
    values = list(change.values())
    largest = max((abs(v) for v in values), default=0.0)
    if any(math.isnan(v) for v in values):
        largest = math.nan
    return {
        "change": change,
        "max_abs_change": largest,
        "exact": all(after[label] == before[label] for label in before),
        "target": target,
        "met": bool(largest <= target),
    }


def _test_outputs(
    model: torch.nn.Module, raw: Mapping[str, Any], sites: Sequence[Path], task: str
) -> tuple[np.ndarray, torch.Tensor, int]:
    """Every site's test label maps of ``task``, the targets and the task's labels."""
    from client.data import build_dataset, label_key
    from client.manifest import load_manifest
    from client.site_folder import manifest_in
    from client.trainer import predict
    from unicon_model.schema import validate_plan

    plan = validate_plan(raw)
    spec = plan.tasks_until(len(plan.stages) - 1)[task]
    modality = plan.stages[0].add_modalities[0]
    outputs: list[np.ndarray] = []
    targets: list[torch.Tensor] = []
    for folder in sites:
        dataset = build_dataset(
            load_manifest(manifest_in(folder)),
            split="test",
            modality=modality,
            tasks={task: spec},
            data=plan.data,
        )
        out, batches = predict(model, dataset, spec, device=torch.device("cpu"))
        if not batches:
            continue
        outputs.append(out)
        mask = torch.cat([b[label_key(task, "mask")] for b in batches]).long()
        targets.append(mask.reshape(out.shape))
    if not outputs:
        raise ValueError(f"no site has a test case labelled for {task!r}")
    return np.concatenate(outputs), torch.cat(targets), spec.num_outputs


def _per_case(pred: np.ndarray, target: torch.Tensor, labels: int) -> torch.Tensor:
    from unicon_model.metrics.segmentation import dice_per_case

    return dice_per_case(torch.from_numpy(pred).long(), target, num_labels=labels)


def stage_seconds(registry: Any, raw: Mapping[str, Any]) -> dict[str, float]:
    """Each stage of the plan ``raw`` run in ``registry``: its rounds' summed wall seconds."""
    from simulations.baseline_runs import round_records

    stage_s = {str(s["name"]): 0.0 for s in raw["stages"]}
    for record in round_records(registry, raw["name"]):
        stage_s[str(record["stage"])] += float(record.get("wall_s", 0.0))
    return stage_s


def example_on_learning_sites(
    work: Path,
    *,
    quick: bool,
    example: Path,
    plan: Callable[..., dict[str, Any]],
    bench: Callable[[Mapping[str, Any], Sequence[Path], Path], dict[str, Any]],
    name: str,
    what: str,
) -> dict[str, Any]:
    """``bench(raw, sites, work)`` on the learning scenario's sites (generated under
    ``work/sites``, :func:`simulations.bench_learning.learning_scenario`), with ``raw`` the
    example plan ``plan(patch_size=..., min_sites=...)`` at the scenario's patch size;
    ``{"error": why}`` if it cannot run (the other figures are kept). ``name`` names the
    benchmark in the warning, ``what`` describes it in the progress line."""
    from simulations.baselines import BaselineError
    from simulations.bench_learning import learning_scenario

    progress(f"learning: {what} …")
    try:
        sites, scenario_raw, scenario = learning_scenario(work, quick=quick)
        patch = int(scenario_raw["data"]["patch_size"][0])
        raw = plan(patch_size=patch, min_sites=min(len(sites), 2))
        hospitals = scenario.rsplit(", ", 1)[0]  # the sites, not the learning plan
        return {
            **bench(raw, sites, work),
            "scenario": f"{hospitals}, {example.name} at {patch}³",
        }
    except (BaselineError, ValueError) as e:
        logger.warning("%s benchmark not run: %s", name, e)
        return {"error": str(e)}


def _run_variant(
    name: str, raw: dict[str, Any], sites: Sequence[Path], work: Path
) -> tuple[dict[str, Any], Path]:
    """Run one variant; its figures and the organ stage's version folder."""
    from simulations.baseline_runs import federate
    from simulations.baselines import Clock
    from unicon_model.metrics.segmentation import mean_dice_of_cases

    clock = Clock()
    registry = federate(raw, sites, work / name)
    trained_s = clock.elapsed()
    completed = registry.progress(raw["name"]).completed
    if len(completed) != len(raw["stages"]):
        raise ValueError(f"{name}: {len(completed)} of {len(raw['stages'])} stages completed")
    organs, lesions = (registry.load(c.version)[0] for c in completed[:2])
    before, target, labels = _test_outputs(organs, raw, sites, ORGAN_TASK)
    after, target_again, _ = _test_outputs(lesions, raw, sites, ORGAN_TASK)
    if not torch.equal(target, target_again):
        raise ValueError(f"{name}: the organ targets differ between the two predictions")
    names = list(raw["stages"][0]["add_tasks"][0]["labels"][1:])
    dice_before = pooled_label_dice(_per_case(before, target, labels), names)
    dice_after = pooled_label_dice(_per_case(after, target, labels), names)
    lesion_pred, lesion_target, lesion_labels = _test_outputs(lesions, raw, sites, LESION_TASK)
    lesion = mean_dice_of_cases(_per_case(lesion_pred, lesion_target, lesion_labels))
    rows = registry.results(raw["name"]).get("R", [])
    stage_s = stage_seconds(registry, raw)
    route = f"{ORGAN_TASK}@{raw['stages'][0]['add_modalities'][0]['name']}"
    return {
        "dice_after_organs": dice_before,
        "dice_after_lesions": dice_after,
        **label_changes(dice_before, dice_after),
        "identical_predictions": bool(np.array_equal(before, after)),
        "lesion_dice": lesion,
        "test_cases": len(target),
        "lesion_test_cases": len(lesion_target),
        "coordinator_R": [dict(r) for r in rows],
        "organ_route": route,
        "stage_s": stage_s,
        "train_s": trained_s,
        "wall_s": clock.elapsed(),
    }, registry.version_dir(completed[0].version)


def bench_new_structures(
    raw: Mapping[str, Any], sites: Sequence[Path], work: Path
) -> dict[str, Any]:
    """Both variants of the organ → lesion plan ``raw`` over ``sites``; see the module doc.

    Returns
    -------
    dict
        ``gradient`` and ``analytic``: each label's pooled test Dice after the organ stage
        and after the lesion stage, :func:`label_changes`'s figures, whether every organ
        prediction stayed bit-identical, the lesion Dice, the coordinator's ``R`` rows and
        seconds (``stage_s``: each stage's summed round wall time; ``train_s``: the run;
        ``wall_s``: with the scoring); ``labels``, ``target_max_abs_change``, ``met`` (both
        within the target and the analytic change exactly 0), the plan's sizes and
        ``wall_s``.
    """
    from simulations.baselines import Clock

    clock = Clock()
    gradient_raw = copy.deepcopy(dict(raw))
    gradient_raw["name"] = f"{raw['name'][:50]}-gradient"
    gradient, encoder = _run_variant("gradient", gradient_raw, sites, work)
    analytic, _ = _run_variant("analytic", analytic_plan(raw, encoder), sites, work)
    stages = raw["stages"]
    return {
        "labels": list(stages[0]["add_tasks"][0]["labels"][1:]),
        "target_max_abs_change": TARGET_MAX_CHANGE,
        "gradient": gradient,
        "analytic": analytic,
        "met": bool(gradient["met"] and analytic["met"] and analytic["exact"]),
        "plan": {
            "name": raw["name"],
            "patch_size": list(raw["data"]["patch_size"]),
            "widths": list(raw["model"]["widths"]),
            "rounds": [s.get("rounds") for s in stages],
            "local_epochs": [s.get("local_epochs") for s in stages],
            "sites": len(sites),
        },
        "wall_s": clock.elapsed(),
    }


def new_structures_gain(work: Path, *, quick: bool) -> dict[str, Any]:
    """:func:`bench_new_structures` on the learning scenario's sites, the example plan at the
    scenario's patch size and its own model and rounds (:func:`example_on_learning_sites`);
    ``{"error": why}`` if it cannot run (the other figures are kept)."""
    return example_on_learning_sites(
        work,
        quick=quick,
        example=EXAMPLE_PLAN,
        plan=structures_plan,
        bench=bench_new_structures,
        name="new-structures",
        what="new structures (organ then lesion stage), earlier labels' Dice",
    )


def new_structures_row(entry: Any) -> tuple[str, str]:
    """The table row of :func:`bench_new_structures`'s figures."""
    title = "new structures: earlier labels' Dice across a lesion stage"
    if not isinstance(entry, dict) or "gradient" not in entry:
        error = entry.get("error") if isinstance(entry, dict) else entry
        return title, f"not computed: {error}"
    parts = []
    stages = list(entry["gradient"]["stage_s"])
    for name in ("gradient", "analytic"):
        v = entry[name]
        dice = ", ".join(f"{k} {d:.3f}" for k, d in v["dice_after_lesions"].items())
        parts.append(
            f"{name} organ head: max |Δ| {v['max_abs_change']:.2e}"
            f"{' (exact)' if v['exact'] else ''} ({dice}; lesion {v['lesion_dice']:.3f}; "
            f"{v['stage_s'][stages[0]]:.0f} s + {v['stage_s'][stages[1]]:.0f} s)"
        )
    verdict = "met" if entry["met"] else "not met"
    target = f"target ≤ {entry['target_max_abs_change']:g}, analytic 0: {verdict}"
    return title, "; ".join(parts) + f"; {target}"


def new_structures_only(out: Path, *, quick: bool) -> dict[str, Any]:
    """``--only new-structures``: this benchmark alone on the learning scenario's sites.

    Writes ``out/results.json`` as ``{"new_structures": {...}}`` and prints its row (in
    ``make bench`` the same figures are ``learning.new_structures``).
    """
    with tempfile.TemporaryDirectory() as tmp:
        entry = new_structures_gain(Path(tmp), quick=quick)
    write_only_results(out, "new_structures", entry)
    title = f"new structures ({entry.get('scenario', 'not run')}, in-process)"
    print_figure_row(title, new_structures_row(entry))
    return entry
