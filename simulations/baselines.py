"""Baselines of ``unicon simulate --compare``, run on the same site folders as UNICON.

Each baseline is a plan transform and/or a different set of sites, run through the same
coordinator and ClientApp (in-process grid), so only the method differs:

- ``naive``: sequential fine-tuning. Every stage trains the shared backbone, the adapters of
  the modalities it trains on and its objective heads, with no regulariser: what parameter
  isolation and regularisation protect against.
- ``ewc`` / ``lwf``: the same shared trainable backbone with elastic weight consolidation or
  learning without forgetting from stage 2 on (regularisation only, no isolation).
- ``centralised``: the UNICON plan on one site that holds every site's cases (upper bound).
- ``local``: the UNICON plan at each site alone (no federation); a site skips the stages it
  has no data for. Pooled metrics are test-case-weighted means over the sites.
- ``no-pet``: every stage that adds a modality with new inputs (PET) instead adds the same
  route on the old inputs only (CT), trained the same way: what the new images add. The
  CT-only route trains at every site with CT, so it sees at least as many cases as the PET
  route.
- ``single-task``: every stage after the first, alone, on a fresh model: its modalities
  (without ``init_from``) and tasks added anew, backbone + modalities + heads trained from
  scratch with the stage's own rounds, epochs, batch size, optimiser, privacy and secure
  aggregation (the same budget), federated over the same sites: each later task's
  "respective baseline". A column's value is the metric when its run ends, carried to later
  stages (separate models forget nothing). The first stage is not rerun: UNICON's first
  stage is already a single-task run, so those columns are left empty.
- ``unet``: a plain MONAI ``BasicUNet`` per segmentation route, trained centrally on the
  pooled cases (:mod:`simulations.unet_baseline`); other tasks have no column.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from client.manifest import load_manifest, manifest_yaml
from client.site_folder import check_unique_sites, manifest_in
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport, seeded_numpy
from simulations.report import MethodResult, method_result
from simulations.unet_baseline import carried_matrix, run_unet
from unicon_model.metrics.uncertainty import CI_METHOD, pooled_interval
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

logger = logging.getLogger(__name__)

METHODS = ("naive", "ewc", "lwf", "centralised", "local", "no-pet", "single-task", "unet")
"""Baselines ``--compare`` knows, in the order they run."""

EWC_WEIGHT = 100.0
LWF_WEIGHT = 1.0
ABLATION_SUFFIX = "-ablation"


class Clock:
    """Seconds since construction: one method's wall time."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the clock was made."""
        return time.perf_counter() - self.started


class BaselineError(ValueError):
    """A baseline cannot run on this plan or these sites (the message says why)."""


def shared_backbone_plan(raw: Mapping[str, Any], *, regulariser: dict[str, Any] | None) -> dict:
    """The plan with every stage training the backbone (no parameter isolation).

    Parameters
    ----------
    raw
        The plan as a dictionary (validated).
    regulariser
        Added to every stage after the first (``None``: no regulariser at all).
    """
    plan = validate_plan(raw)
    out = copy.deepcopy(dict(raw))
    for index, (stage, spec) in enumerate(zip(out["stages"], plan.stages, strict=True)):
        if spec.is_analytic:
            continue
        modalities = [f"modality/{m}" for m in plan.stage_modalities(index)]
        heads = [f"task/{t}" for t in spec.objective_tasks]
        stage["train"] = ["backbone", *modalities, *heads]
        stage["regularisers"] = [regulariser] if regulariser and index > 0 else []
    out["name"] = f"{raw['name']}-{'naive' if regulariser is None else regulariser['kind']}"
    return out


def without_new_inputs_plan(raw: Mapping[str, Any]) -> dict:
    """The plan whose added modalities use only their source modality's inputs.

    A stage adding ``pet`` (inputs ``ct, pet``, initialised from ``ct``) adds ``pet-ablation``
    (inputs ``ct``) instead, initialised the same way and trained the same way.

    Raises
    ------
    BaselineError
        If no stage adds a modality with inputs beyond those of the one it starts from.
    """
    plan = validate_plan(raw)
    out = copy.deepcopy(dict(raw))
    known = {m.name: m for s in plan.stages for m in s.add_modalities}
    changed = []
    for stage in out["stages"]:
        for modality in stage.get("add_modalities", []):
            source = modality.get("init_from")
            if not source:
                continue
            old_inputs = list(known[source].input_keys)
            spec = known[modality["name"]]
            if set(spec.input_keys) <= set(old_inputs):
                continue
            renamed = modality["name"] + ABLATION_SUFFIX
            changed.append(f"{modality['name']} → {renamed} (inputs {old_inputs})")
            modality["name"], modality["inputs"] = renamed, old_inputs
            stage["train"] = [
                f"modality/{renamed}" if c == f"modality/{spec.name}" else c
                for c in stage.get("train", [])
            ]
            if stage.get("modalities"):
                stage["modalities"] = [
                    renamed if m == spec.name else m for m in stage["modalities"]
                ]
    if not changed:
        raise BaselineError(
            f"plan {raw['name']!r} adds no modality with new inputs (such as PET over CT): "
            "the no-pet baseline has nothing to ablate"
        )
    logger.info("no-pet baseline: %s", "; ".join(changed))
    out["name"] = f"{raw['name']}-no-pet"
    return out


def without_secure_aggregation(raw: Mapping[str, Any]) -> dict:
    """The plan for a single site: no secure aggregation, one site suffices."""
    out = copy.deepcopy(dict(raw))
    for stage in out["stages"]:
        stage["secure_aggregation"] = False
        stage["min_sites"] = 1
    return out


def write_pooled_site(site_dirs: Sequence[Path], out: Path) -> Path:
    """One site folder whose manifest lists every site's cases (absolute file paths).

    Case ids are prefixed by the site folder's name when two sites use the same id.

    Raises
    ------
    BaselineError
        If the sites declare the same task differently.
    """
    tasks: dict[str, Any] = {}
    cases: list[dict[str, Any]] = []
    paths = {d: manifest_in(d) for d in site_dirs}
    manifests = {d: _raw_manifest(p) for d, p in paths.items()}
    ids = [c["id"] for m in manifests.values() for c in m["cases"]]
    clash = len(ids) != len(set(ids))
    for folder, manifest in manifests.items():
        for name, task in manifest.get("tasks", {}).items():
            if tasks.setdefault(name, task) != task:
                raise BaselineError(
                    f"{paths[folder]}: task {name!r} is declared differently at "
                    "another site; the pooled (centralised) baseline needs one definition"
                )
        root = folder.resolve()
        for case in manifest["cases"]:
            pooled = copy.deepcopy(case)
            if clash:
                pooled["id"] = f"{manifest['site']}-{case['id']}"
            pooled["images"] = {k: str(root / v) for k, v in case["images"].items()}
            for name, label in case.get("labels", {}).items():
                if isinstance(label, str) and tasks.get(name, {}).get("kind") == "segmentation":
                    pooled["labels"][name] = str(root / label)
            cases.append(pooled)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.yaml"
    path.write_text(manifest_yaml({"site": "pooled", "tasks": tasks, "cases": cases}))
    return out


def _cases(site_dir: Path) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = _raw_manifest(manifest_in(site_dir))["cases"]
    return cases


def _raw_manifest(path: Path) -> dict[str, Any]:
    """A manifest's plain content, read only after the site's own validation accepted it.

    :func:`client.manifest.load_manifest` refuses oversized files, YAML aliases, deep nesting
    and bad names first, so the plain re-read below cannot blow up.
    """
    load_manifest(path)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    return raw


def _test_cases(cases: Sequence[Mapping[str, Any]], inputs: Sequence[str]) -> int:
    return sum(
        1 for c in cases if c.get("split") == "test" and all(k in c["images"] for k in inputs)
    )


def _site_can_train(cases: Sequence[Mapping[str, Any]], plan: Plan, index: int) -> bool:
    modalities = plan.modalities_until(index)
    needed = [modalities[m].input_keys for m in plan.stage_modalities(index)]
    tasks = plan.stages[index].objective_tasks
    return any(
        c.get("split") == "train"
        and all(all(k in c["images"] for k in keys) for keys in needed)
        and any(t in c.get("labels", {}) for t in tasks)
        for c in cases
    )


def _federate(raw: dict, site_dirs: Sequence[Path], work: Path) -> Registry:
    plan = validate_plan(raw)
    registry = Registry(work / "registry")
    transport = InProcessTransport(list(site_dirs), work / "state")
    with seeded_numpy(plan.model.seed):
        Coordinator(plan, registry, transport, site_wait=0).run()
    return registry


def _result(name: str, registry: Registry, plan_name: str, wall_s: float) -> MethodResult:
    rounds = [r for r in registry.metrics(plan_name) if r.get("kind") == "round"]
    return method_result(name, registry.results(plan_name), rounds, wall_s)


def run_federated(
    name: str, raw: dict, site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """A plan transform run over all the sites."""
    registry = _federate(raw, site_dirs, work / name)
    return _result(name, registry, raw["name"], wall())


def final_model(registry_root: Path, plan_name: str) -> UniconModel:
    """The model of the last stage of ``plan_name`` completed in a registry.

    ``run_federated(name, raw, sites, work, ...)`` (and :func:`run_baseline` for ``naive``,
    ``ewc``, ``lwf`` and ``no-pet``) keeps its registry in ``work/<name>/registry``;
    ``plan_name`` is the plan's name as run (``raw["name"]``; ``<plan>-no-pet`` for the
    ``no-pet`` baseline, see :func:`without_new_inputs_plan`).

    Raises
    ------
    BaselineError
        If ``registry_root`` holds no registry or no stage of ``plan_name`` completed there.
    """
    if not (registry_root / "versions").is_dir():
        raise BaselineError(f"{registry_root}: no registry there; run the method first")
    registry = Registry(registry_root)
    completed = registry.progress(plan_name).completed
    if not completed:
        raise BaselineError(
            f"{registry_root}: plan {plan_name!r} completed no stage "
            f"(plans there: {registry.plans()})"
        )
    model, _ = registry.load(completed[-1].version)
    return model


def run_centralised(
    raw: dict,
    site_dirs: Sequence[Path],
    work: Path,
    wall: Callable[[], float],
    held_out: Sequence[Path] = (),
) -> MethodResult:
    """The plan on one site holding every site's cases.

    ``held_out`` sites (the plan's ``holdout_sites``) are not pooled: they stay sites of
    their own, which the coordinator only evaluates (the unseen hospital).
    """
    pooled = write_pooled_site(site_dirs, work / "centralised" / "data" / "pooled")
    single = without_secure_aggregation(raw)
    registry = _federate(single, [pooled, *held_out], work / "centralised")
    return _result("centralised", registry, single["name"], wall())


def run_local(
    raw: dict, site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """The plan at every site alone; pooled R = test-case-weighted mean over the sites."""
    plan = validate_plan(raw)
    stages = [s.name for s in plan.stages]
    per_site: dict[str, list[dict[str, float]]] = {}
    bytes_up: dict[str, int] = {}
    bytes_down: dict[str, int] = {}
    epsilon: dict[str, float] = {}
    weights: dict[str, dict[str, int]] = {}
    per_site_ci: dict[str, list[dict[str, Any]]] = {}
    per_site_se: dict[str, list[dict[str, Any]]] = {}
    rounds: list[dict[str, Any]] = []
    modalities = plan.modalities_until(len(plan.stages) - 1)
    names = check_unique_sites(site_dirs)
    for folder in site_dirs:
        site = names[Path(folder)]
        cases = _cases(folder)
        keep = [i for i in range(len(plan.stages)) if _site_can_train(cases, plan, i)]
        if not keep:
            continue
        single = without_secure_aggregation(raw)
        single["stages"] = [single["stages"][i] for i in keep]
        single["name"] = f"{raw['name']}-local-{site}"
        registry = _federate(single, [folder], work / "local" / site)
        results = registry.results(single["name"])
        rows = dict(zip(results["stages"], results["R"], strict=True))
        filled: list[dict[str, float]] = []
        for stage in stages:  # a skipped stage leaves the site's model as it was
            filled.append(rows.get(stage, filled[-1] if filled else {}))
        per_site[site] = filled
        # the site's own bootstrap interval and standard error, carried like its metric
        for key, store in (("R_per_site_ci", per_site_ci), ("R_per_site_se", per_site_se)):
            own = results.get(key, {}).get(site, {})
            carried: list[dict[str, Any]] = []
            for stage in stages:
                carried.append(own.get(stage, carried[-1] if carried else {}))
            store[site] = carried
        bytes_up[site] = 0  # nothing leaves the site
        bytes_down[site] = 0
        epsilon.update(results.get("epsilon", {}))
        weights[site] = {m: _test_cases(cases, spec.input_keys) for m, spec in modalities.items()}
        rounds += [r for r in registry.metrics(single["name"]) if r.get("kind") == "round"]
    pooled_rows: list[dict[str, float]] = []
    pooled_ci: list[dict[str, list[float]]] = []
    for i in range(len(stages)):
        columns = sorted({c for rows in per_site.values() for c in rows[i]})
        row = {}
        intervals: dict[str, list[float]] = {}
        for column in columns:
            modality = column.split("@", 1)[1]
            pairs = [
                (rows[i][column], weights[s].get(modality, 0))
                for s, rows in per_site.items()
                if column in rows[i] and math.isfinite(rows[i][column])
            ]
            if pairs and sum(w for _, w in pairs) > 0:
                row[column] = float(
                    np.average([v for v, _ in pairs], weights=[w for _, w in pairs])
                )
                ci = _pooled_ci(column, i, per_site, per_site_se, weights)
                if ci is not None:
                    intervals[column] = ci
        pooled_rows.append(row)
        pooled_ci.append(intervals)
    registry_like = {
        "stages": stages,
        "R": pooled_rows,
        "R_per_site": {s: dict(zip(stages, rows, strict=True)) for s, rows in per_site.items()},
        "R_ci": pooled_ci,
        "R_per_site_ci": {
            s: dict(zip(stages, rows, strict=True)) for s, rows in per_site_ci.items()
        },
        "R_ci_method": CI_METHOD,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "epsilon": epsilon,
    }
    return method_result("local", registry_like, rounds, wall())


def _pooled_ci(
    column: str,
    stage: int,
    per_site: Mapping[str, list[dict[str, float]]],
    per_site_se: Mapping[str, list[dict[str, Any]]],
    weights: Mapping[str, Mapping[str, int]],
) -> list[float] | None:
    """Interval of the ``local`` baseline's weighted mean from each site's own bootstrap se.

    None unless every contributing site recorded a standard error (see
    :func:`unicon_model.metrics.uncertainty.pooled_interval`).
    """
    modality = column.split("@", 1)[1]
    values, errors, cases = [], [], []
    for site, rows in per_site.items():
        value = rows[stage].get(column)
        if value is None or not math.isfinite(value) or weights[site].get(modality, 0) <= 0:
            continue
        se_rows = per_site_se.get(site, [])
        se = se_rows[stage].get(column) if stage < len(se_rows) else None
        values.append(value)
        errors.append(float(se) if isinstance(se, int | float) else math.nan)
        cases.append(weights[site].get(modality, 0))
    if not values:
        return None
    _, interval = pooled_interval(values, errors, cases)
    return [interval.lo, interval.hi] if math.isfinite(interval.se) else None


def single_task_plans(raw: Mapping[str, Any]) -> list[tuple[int, dict]]:
    """One single-stage plan per stage after the first, training it from scratch.

    Stage ``i``'s plan adds the modalities it trains on (without ``init_from``) and its
    objective tasks, trains ``backbone`` + those modalities + those heads (an analytic stage
    trains nothing, as before), and keeps the stage's rounds, local epochs, batch size,
    optimiser, privacy, secure aggregation and site bounds. Regularisers that refer to
    earlier stages (EWC, LwF) are dropped; FedProx stays.

    Returns
    -------
    list of (int, dict)
        The stage index and its plan, named ``<plan>-single-<index>``.

    Raises
    ------
    BaselineError
        If the plan has a single stage (nothing is added later).
    """
    plan = validate_plan(raw)
    if len(plan.stages) < 2:
        raise BaselineError(
            f"plan {raw['name']!r} has one stage: the single-task baseline compares the tasks "
            "added after the first stage, and there are none"
        )
    modalities: dict[str, dict[str, Any]] = {}
    tasks: dict[str, dict[str, Any]] = {}
    for stage in raw["stages"]:
        modalities.update({m["name"]: m for m in stage.get("add_modalities", [])})
        tasks.update({t["name"]: t for t in stage.get("add_tasks", [])})
    out: list[tuple[int, dict]] = []
    for index in range(1, len(plan.stages)):
        spec = plan.stages[index]
        stage = copy.deepcopy(dict(raw["stages"][index]))
        routes = plan.stage_modalities(index)
        heads = spec.objective_tasks
        # from scratch: no source modality, and the stage's own decoder trains in full (no
        # decoder deltas, which adapt an earlier stage's decoder)
        stage["add_modalities"] = [
            {**copy.deepcopy(modalities[m]), "init_from": None, "decoder_lora": {}} for m in routes
        ]
        stage["add_tasks"] = [copy.deepcopy(tasks[t]) for t in heads]
        stage["objectives"] = []
        stage["modalities"] = []
        stage["train"] = (
            []
            if spec.is_analytic
            else ["backbone", *(f"modality/{m}" for m in routes), *(f"task/{t}" for t in heads)]
        )
        stage["regularisers"] = [
            r for r in stage.get("regularisers", []) if r.get("kind") == "fedprox"
        ]
        single = copy.deepcopy(dict(raw))
        single["stages"] = [stage]
        single["name"] = f"{raw['name'][:50]}-single-{index}"
        out.append((index, single))
    return out


def run_single_task(
    raw: dict, site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """Each stage after the first alone, from scratch, federated; see :func:`single_task_plans`.

    R[stage, column]: the column's pooled metric at the end of the run of the stage that adds
    it, carried to later stages; bytes and ε are summed over the runs per site.
    """
    plan = validate_plan(raw)
    stages = plan.stage_names
    pooled: dict[str, float] = {}
    per_site: dict[str, dict[str, float]] = {}
    pooled_ci: dict[str, list[float]] = {}
    per_site_ci: dict[str, dict[str, list[float]]] = {}
    introduced: dict[str, int] = {}
    bytes_up: dict[str, int] = {}
    bytes_down: dict[str, int] = {}
    epsilon: dict[str, float] = {}
    rounds: list[dict[str, Any]] = []
    for index, single in single_task_plans(raw):
        registry = _federate(single, site_dirs, work / "single-task" / str(index))
        results = registry.results(single["name"])
        rows = results.get("R", [])
        for column, value in (rows[-1] if rows else {}).items():
            pooled[column] = value
            introduced.setdefault(column, index)
        for site, by_stage in results.get("R_per_site", {}).items():
            per_site.setdefault(site, {}).update(by_stage.get(stages[index], {}))
        ci_rows = results.get("R_ci", [])
        pooled_ci.update(ci_rows[-1] if ci_rows else {})
        for site, by_stage in results.get("R_per_site_ci", {}).items():
            per_site_ci.setdefault(site, {}).update(by_stage.get(stages[index], {}))
        for site, n in results.get("bytes_up", {}).items():
            bytes_up[site] = bytes_up.get(site, 0) + int(n)
        for site, n in results.get("bytes_down", {}).items():
            bytes_down[site] = bytes_down.get(site, 0) + int(n)
        for site, eps in results.get("epsilon", {}).items():
            epsilon[site] = epsilon.get(site, 0.0) + float(eps or 0.0)
        rounds += [r for r in registry.metrics(single["name"]) if r.get("kind") == "round"]
    rows, site_rows = carried_matrix(stages, introduced, pooled, per_site)
    rows_ci, site_rows_ci = carried_matrix(stages, introduced, pooled_ci, per_site_ci)
    registry_like = {
        "stages": stages,
        "R": rows,
        "R_per_site": site_rows,
        "R_ci": rows_ci,
        "R_per_site_ci": site_rows_ci,
        "R_ci_method": CI_METHOD,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "epsilon": epsilon,
    }
    return method_result("single-task", registry_like, rounds, wall())


def run_baseline(
    method: str, raw: dict, site_dirs: Sequence[Path], work: Path, wall: Callable[[], float]
) -> MethodResult:
    """Run one baseline of :data:`METHODS` on the UNICON plan ``raw`` over ``site_dirs``.

    The plan's ``[evaluation] holdout_sites`` never train: the federated baselines leave
    them to the coordinator (which scores them as the unseen hospital), ``centralised`` keeps
    them out of the pooled site and scores them, ``local`` and ``unet`` run without them.

    Raises
    ------
    BaselineError
        If ``method`` is unknown or cannot run on this plan/sites.
    """
    holdout = set((raw.get("evaluation") or {}).get("holdout_sites") or ())
    names = check_unique_sites(site_dirs) if holdout else {}
    held_out = [d for d in site_dirs if names.get(Path(d)) in holdout]
    training = [d for d in site_dirs if d not in held_out]
    if method == "centralised":
        return run_centralised(raw, training, work, wall, held_out)
    if method == "local":
        return run_local({k: v for k, v in raw.items() if k != "evaluation"}, training, work, wall)
    if method == "unet":
        return run_unet(raw, training, work, wall)
    if method == "naive":
        return run_federated(
            method, shared_backbone_plan(raw, regulariser=None), site_dirs, work, wall
        )
    if method == "ewc":
        plan = shared_backbone_plan(raw, regulariser={"kind": "ewc", "weight": EWC_WEIGHT})
        return run_federated(method, plan, site_dirs, work, wall)
    if method == "lwf":
        plan = shared_backbone_plan(raw, regulariser={"kind": "lwf", "weight": LWF_WEIGHT})
        return run_federated(method, plan, site_dirs, work, wall)
    if method == "no-pet":
        return run_federated(method, without_new_inputs_plan(raw), site_dirs, work, wall)
    if method == "single-task":
        return run_single_task(raw, site_dirs, work, wall)
    raise BaselineError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")


def parse_methods(text: str) -> list[str]:
    """``all`` or a comma-separated list of :data:`METHODS` (validated, in run order).

    Raises
    ------
    BaselineError
        Naming every unknown method at once.
    """
    wanted = list(METHODS) if text.strip() == "all" else [m.strip() for m in text.split(",")]
    unknown = [m for m in wanted if m not in METHODS]
    if unknown:
        raise BaselineError(
            f"unknown baseline(s) {unknown}; choose from {', '.join(METHODS)} or 'all'"
        )
    return [m for m in METHODS if m in wanted]
