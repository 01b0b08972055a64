"""System benchmarks measured side by side in one run (``make bench``).

Prints a table and writes ``bench/results.json``:

- **upload**: bytes a site uploads per round of each UNICON stage vs the full model;
- **secagg**: wall time per round with SecAgg+ vs plain FedAvg, same sites and stage;
- **scale**: wall time per round and peak memory (this process) at several site counts with a
  tiny model; the first round (preprocessing, caching, every component sent) apart from the
  steady state (round 2 on), whose framework overhead is round wall time / summed site
  training + evaluation time (the in-process engine serves the sites one after another), with
  the mean time of every phase (see :mod:`server.timing`);
- **analytic**: federated vs pooled ridge head, max difference, IID and one class per site;
- **bootstrap**: what the evaluation's bootstrap intervals and calibration add to a
  ``make simulate`` run (:func:`bench_bootstrap_overhead`).

and the **learning** benchmarks on the default UNICON scenario (4 generated hospitals, 32³,
the plan of ``make simulate``):

- **forgetting**: BWT and average forgetting of UNICON vs naive sequential fine-tuning;
- **federated / centralised**: each task's final metric, UNICON over the centralised run;
- **DP utility**: the foundation and prognosis stages with DP-SGD at every site for
  ε ∈ {1, 4, 8} per stage, next to the same stages without DP (ε = ∞).

Everything runs the real ClientApp through the in-process grid (the ServerApp's own
transport), so the figures compare protocols and methods, not engines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from client.manifest import manifest_yaml
from client.site_folder import manifest_in, site_name, site_state_dir
from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.synthetic import make_sites
from unicon_model.analytic import AnalyticHead
from unicon_model.components import component_sizes
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

logger = logging.getLogger(__name__)
console = Console()

TINY_MODEL = {"spatial_dims": 3, "widths": [4, 8, 16], "adapter_rank": 2, "head_hidden": 8}


def _plan(stages: list[dict[str, Any]], name: str) -> Plan:
    return validate_plan(
        {"name": name, "model": TINY_MODEL, "data": {"patch_size": [16, 16, 16]}, "stages": stages}
    )


FOUNDATION = {
    "name": "foundation",
    "add_modalities": [{"name": "ct"}],
    "add_tasks": [
        {"name": "lesion-class", "kind": "classification", "classes": ["benign", "malignant"]}
    ],
    "train": ["backbone", "modality/ct", "task/lesion-class"],
    "rounds": 1,
    "batch_size": 4,
}
PROGNOSIS = {
    "name": "prognosis",
    "rounds": 1,
    "add_tasks": [{"name": "survival", "kind": "survival", "covariates": ["age", "stage"]}],
}
SEGMENTATION = {
    "name": "segmentation",
    "rounds": 1,
    "add_tasks": [
        {"name": "lesion-seg", "kind": "segmentation", "labels": ["background", "tumour"]}
    ],
}
PET = {
    "name": "pet",
    "rounds": 1,
    "objectives": ["lesion-seg"],
    "add_modalities": [{"name": "pet", "inputs": ["ct", "pet"], "init_from": "ct"}],
}


def _run(plan: Plan, sites: Sequence[Path], work: Path) -> tuple[Registry, InProcessTransport]:
    registry = Registry(work / "registry")
    transport = InProcessTransport(list(sites), work / "state")
    Coordinator(plan, registry, transport, site_wait=0).run()
    return registry, transport


def bench_upload(sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Bytes uploaded per site per round in each stage vs the full model's size."""
    plan = _plan([FOUNDATION, PROGNOSIS, SEGMENTATION, PET], "upload")
    _run(plan, sites, work)
    full = sum(component_sizes(UniconModel.from_plan(plan)).values()) * 4
    per_stage: dict[str, float] = {}
    for index, stage in enumerate(plan.stages):
        model = UniconModel.from_plan(plan, through_stage=index)
        sizes = component_sizes(model)
        per_stage[stage.name] = 4.0 * sum(sizes[c] for c in stage.trained_components)
    return {
        "full_model_bytes": full,
        "upload_bytes_per_round": per_stage,
        "fraction_of_full": {k: v / full for k, v in per_stage.items()},
    }


def bench_secagg(sites: Sequence[Path], work: Path, rounds: int = 2) -> dict[str, Any]:
    """Wall time per round of the same stage with SecAgg+ and with plain FedAvg."""
    result: dict[str, Any] = {"sites": len(sites)}
    for secure in (False, True):
        stage = {**FOUNDATION, "rounds": rounds, "min_sites": len(sites)}
        if secure:
            stage |= {
                "secure_aggregation": True,
                "secagg": {"num_shares": min(len(sites), 5) | 1, "reconstruction_threshold": 2},
            }
        plan = _plan([stage], "secagg-secure" if secure else "secagg-plain")
        registry, _ = _run(plan, sites, work / f"secure-{secure}")
        walls = [r["wall_s"] for r in registry.metrics(plan.name) if r["kind"] == "round"]
        result["secure_s" if secure else "plain_s"] = float(np.mean(walls))
    result["ratio"] = result["secure_s"] / result["plain_s"]
    return result


def bench_scale(sites: Sequence[Path], work: Path, rounds: int = 3) -> dict[str, Any]:
    """First-round and steady-state round wall time, overhead and peak memory for one stage."""
    plan = _plan([{**FOUNDATION, "min_sites": 1, "rounds": rounds}], f"scale-{len(sites)}")
    started = time.perf_counter()
    registry, _ = _run(plan, sites, work)
    total = time.perf_counter() - started
    records = [r for r in registry.metrics(plan.name) if r["kind"] == "round"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    local = 0.0  # the sites' own training time, from their audit logs
    for folder in sites:
        log = site_state_dir(work / "state", site_name(folder)) / "audit.jsonl"
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry["event"] == "train" and entry["record"].get("round") == 1:
                local += float(entry["record"].get("metrics", {}).get("train_s", 0.0))
    return {
        "sites": len(sites),
        "round_s": records[0]["wall_s"],
        "first_round_s": records[0]["wall_s"],
        "stage_s": total,
        "local_train_s": local,
        "overhead_first_round": records[0]["wall_s"] / max(local, 1e-9),
        **steady_state(records, workers=1),
        "peak_rss_mib": peak_mib,
    }


def steady_state(records: Sequence[Mapping[str, Any]], *, workers: int | None) -> dict[str, Any]:
    """Framework overhead of the rounds after the first (caches warm) from their timing.

    Per round: wall time / the shortest time the sites' training + evaluation could take on
    ``workers`` sites at once: their sum for a sequential engine (``workers=1``), the
    largest site's when every site has its own worker (``None``), and in between the larger
    of the largest site's and the sum / ``workers`` (Flower's Ray actors). Returns the mean
    round wall time and overhead of rounds 2 on (NaN with one round) and the mean seconds
    of every phase of those rounds: the coordinator's, and the sites' summed.
    """
    later = [r for r in records if r.get("round", 0) >= 2 and "timing" in r]
    if not later:
        return {"steady_round_s": math.nan, "steady_overhead": math.nan, "steady_phases": {}}
    ratios: list[float] = []
    phases: dict[str, float] = {}
    for record in later:
        timing = record["timing"]
        work = [
            p.get("train_s", 0.0) + p.get("eval_s", 0.0) for p in timing.get("sites", {}).values()
        ]
        if not work:
            useful = 0.0
        elif workers is None:
            useful = max(work)
        else:
            useful = max(max(work), sum(work) / workers)
        ratios.append(record["wall_s"] / useful if useful > 0 else math.nan)
        for name, value in timing.get("coordinator", {}).items():
            phases[f"coordinator/{name}"] = phases.get(f"coordinator/{name}", 0.0) + value
        for site_phases in timing.get("sites", {}).values():
            for name, value in site_phases.items():
                phases[f"sites/{name}"] = phases.get(f"sites/{name}", 0.0) + value
    return {
        "steady_round_s": float(np.mean([r["wall_s"] for r in later])),
        "steady_overhead": float(np.mean(ratios)),
        "steady_phases": {k: v / len(later) for k, v in sorted(phases.items())},
    }


def bench_analytic(sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Federated ridge head vs the pooled solution (sklearn-free: numpy normal equations)."""
    from client.data import build_dataset
    from client.manifest import load_manifest

    ridge = {
        "name": "ridge",
        "rounds": 1,
        "add_tasks": [
            {
                "name": "lesion-class",
                "kind": "classification",
                "classes": ["benign", "malignant"],
                "head": "analytic",
                "l2": 1.0,
            }
        ],
    }
    base = {
        **FOUNDATION,
        "add_tasks": [{"name": "survival", "kind": "survival", "covariates": ["age", "stage"]}],
        "train": ["backbone", "modality/ct", "task/survival"],
    }
    plan = _plan([base, ridge], "analytic")
    registry, _ = _run(plan, sites, work)
    model, _ = registry.load(registry.versions()[-1])
    foundation, _ = registry.load(registry.versions()[0])
    features, targets = [], []
    task = plan.tasks_until(1)["lesion-class"]
    for folder in sites:
        data = build_dataset(
            load_manifest(manifest_in(folder)),
            split="train",
            modality=plan.modalities_until(0)["ct"],
            tasks={"lesion-class": task},
            data=plan.data,
        )
        if not len(data):
            continue
        with torch.no_grad():
            images = torch.stack([s["image"] for s in data.samples])
            features.append(foundation.pooled_features(images, modality="ct").double().numpy())
        labels = np.array([int(s["lesion-class:label"]) for s in data.samples])
        targets.append(np.eye(2)[labels])
    x, y = np.concatenate(features), np.concatenate(targets)
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    weight = np.linalg.solve(xc.T @ xc + 1.0 * np.eye(x.shape[1]), xc.T @ yc).T
    head = model.tasks["lesion-class"]
    assert isinstance(head, AnalyticHead)
    difference = float(np.abs(head.weight.double().numpy() - weight).max())
    return {"max_abs_difference": difference, "cases": int(x.shape[0])}


def _one_class_sites(out: Path, count: int) -> list[Path]:
    """Site folders whose training cases all carry one class (alternating per site)."""
    import yaml

    folders: list[Path] = []
    for path in make_sites(out, sites=count, seed=5, size=16, cases_per_site=8, pet_sites=0):
        manifest = yaml.safe_load(path.read_text())
        wanted = ["benign", "malignant"][len(folders) % 2]
        for case in manifest["cases"]:
            if case["split"] == "train" and case["labels"]["lesion-class"] != wanted:
                case["split"] = "val"
        path.write_text(manifest_yaml(manifest))
        folders.append(path.parent)
    return folders


def bench_learning(
    work: Path, *, quick: bool = False, epsilons: Sequence[float] = (1.0, 4.0, 8.0)
) -> dict[str, Any]:
    """UNICON vs naive and centralised, and DP utility, on the default (or quick) scenario.

    The default scenario is ``make simulate``'s (4 hospitals, 32³, ~40 cases each); the quick
    one is ``--quick``'s plan over 3 hospitals of 16³ with ~40 cases each (minutes, not an
    hour, on 2 cores).
    """
    from simulations.baselines import Clock, run_baseline, run_federated
    from simulations.cli import DEFAULT_PLAN, plan_for_run
    from simulations.report import MethodResult, comparisons, final_metrics

    count, size = (3, 16) if quick else (4, 32)
    seed = 7 if quick else 0
    sites = [
        p.parent
        for p in make_sites(
            work / "sites", sites=count, seed=seed, size=size, cases_per_site=40, pet_sites=2
        )
    ]
    raw = plan_for_run(DEFAULT_PLAN, quick=quick, dp=None, secure_sites=len(sites))
    methods: dict[str, MethodResult] = {}
    for name in LEARNING_METHODS:
        console.print(f"learning: {name} …")
        clock = Clock()
        if name == "unicon":
            methods[name] = run_federated(name, raw, sites, work, clock.elapsed)
        else:
            methods[name] = run_baseline(name, raw, sites, work, clock.elapsed)
    compared = comparisons(methods)
    dp: dict[str, dict[str, float]] = {}
    unicon = methods["unicon"]
    prognosis = unicon.stages.index("prognosis")
    dp["inf"] = {t: v for t, v in zip(unicon.tasks, unicon.R[prognosis], strict=True) if v == v}
    for epsilon in epsilons:
        console.print(f"learning: DP-SGD at ε = {epsilon:g} …")
        private = plan_for_run(DEFAULT_PLAN, quick=quick, dp=epsilon, secure_sites=len(sites))
        private["stages"] = private["stages"][: prognosis + 1]
        private["name"] = f"{raw['name']}-dp{epsilon:g}"
        clock = Clock()
        result = run_federated(f"dp{epsilon:g}", private, sites, work, clock.elapsed)
        dp[f"{epsilon:g}"] = final_metrics(result)
        dp[f"{epsilon:g}"]["max_epsilon_spent"] = max(result.epsilon.values(), default=0.0)
    pet_subtle = _subtle_gain(raw, sites, work)
    return {
        "scenario": f"{count} hospitals, {size}³, ~40 cases each, "
        + ("quick plan" if quick else "default plan"),
        "upload_fraction": upload_fractions(raw),
        "pet_gain": compared.get("pet_gain", {}),
        "pet_gain_subtle": pet_subtle,
        "unicon_over_unet": compared.get("unicon_over_unet", {}),
        "unicon_minus_best_baseline": compared.get("unicon_minus_best_baseline", {}),
        "bwt": {n: m.bwt for n, m in methods.items()},
        "forgetting": {n: m.forgetting for n, m in methods.items()},
        "final": {n: final_metrics(m) for n, m in methods.items()},
        "wall_s": {n: m.wall_s for n, m in methods.items()},
        "federated_over_centralised": compared.get("federated_over_centralised", {}),
        "dp_utility": dp,
    }


def _subtle_gain(raw: Mapping[str, Any], sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """PET gain on the subtle lesions (:mod:`simulations.subtle_lesions`) of the final UNICON
    and ``no-pet`` models that :func:`bench_learning` ran under ``work``; ``{"error": why}``
    if it cannot be computed (the other figures are kept)."""
    from simulations.baselines import BaselineError, final_model, without_new_inputs_plan
    from simulations.subtle_lesions import SubtleLesionError, pet_gain_subtle

    console.print("learning: PET gain on the lesions barely visible on CT …")
    try:
        return pet_gain_subtle(
            raw,
            sites,
            final_model(work / "unicon" / "registry", raw["name"]),
            final_model(work / "no-pet" / "registry", without_new_inputs_plan(raw)["name"]),
        )
    except (BaselineError, SubtleLesionError) as e:
        logger.warning("PET gain on subtle lesions not computed: %s", e)
        return {"error": str(e)}


LEARNING_METHODS = ("unicon", "naive", "ewc", "lwf", "single-task", "centralised", "unet", "no-pet")
"""Methods of the learning benchmark, all on the same sites in one run."""


def upload_fractions(raw: Mapping[str, Any]) -> dict[str, float]:
    """Per stage: values a site uploads per round (the trained components, LoRA and decoder
    deltas included) over the values of the whole model at the end of the stage."""
    from unicon_model.components import select_state
    from unicon_model.model import UniconModel
    from unicon_model.schema import validate_plan

    plan = validate_plan(raw)
    out: dict[str, float] = {}
    for index, stage in enumerate(plan.stages):
        model = UniconModel.from_plan(plan, through_stage=index)
        total = sum(v.numel() for v in model.state_dict().values())
        sent = sum(v.numel() for v in select_state(model, stage.trained_components).values())
        out[stage.name] = sent / total
    return out


EVALUATION_EXTRAS = ("classification_extras", "survival_extras", "segmentation_extras")
"""What :func:`client.trainer.evaluate` adds per route: bootstrap interval, calibration."""


def _extras_patched(store: dict[str, float], *, enabled: bool) -> ExitStack:
    """:data:`EVALUATION_EXTRAS` in ``client.trainer`` timed (``store[route]``) or disabled."""
    from unittest import mock

    import client.trainer as trainer

    def timed(real: Any) -> Any:
        def wrapped(route: str, *args: Any, **kwargs: Any) -> Any:
            if not enabled:
                return {}
            started = time.perf_counter()
            try:
                return real(route, *args, **kwargs)
            finally:
                store[route] = store.get(route, 0.0) + time.perf_counter() - started

        return wrapped

    stack = ExitStack()
    for name in EVALUATION_EXTRAS:
        stack.enter_context(mock.patch.object(trainer, name, timed(getattr(trainer, name))))
    return stack


def evaluation_requests(metrics: Path) -> list[list[str]]:
    """The routes of every evaluation request a run's sites served, from ``metrics.jsonl``.

    One entry per site and validation round (a round record's ``val.per_site``) and per site
    and test evaluation after a stage (an evaluation record's ``per_site`` and
    ``unseen.per_site``).
    """
    requests: list[list[str]] = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "round":
            per_site = (record.get("val") or {}).get("per_site") or {}
        elif record.get("kind") == "evaluation":
            unseen = (record.get("unseen") or {}).get("per_site") or {}
            per_site = {**(record.get("per_site") or {}), **unseen}
        else:
            continue
        requests += [list(routes) for routes in per_site.values()]
    return requests


def bench_bootstrap_overhead(
    work: Path, *, simulate_out: Path | None = None, repeats: int = 1
) -> dict[str, Any]:
    """What the evaluation's bootstrap intervals and calibration add to ``make simulate``.

    One generated hospital of the default scenario (32³, 40 labelled cases, CT and PET: ~10
    test cases per route) and the default plan's full model: ``evaluate`` of
    :func:`client.trainer.evaluate` per modality, timed with the extras and with them
    disabled (interleaved, best of ``repeats``: on a busy machine the difference is within
    its noise), and the extras' own time per route measured inside the full call. The
    membership attack's bootstrap (after the run) is timed on 4 sites x (25 members, 10
    non-members) per trained route.

    The run's cost is the extras' time per route summed over the evaluation requests of a
    ``make simulate`` run (``simulate_out``, default ``$UNICON_SIMULATE_OUT`` or ``report``:
    its registry's ``metrics.jsonl``, every route each site evaluated), else of the plan
    (4 sites x stages x (1 + validated rounds), every route learned so far: an upper bound),
    plus the attack's; ``share_of_simulate`` divides it by that run's ``wall_s`` (NaN without
    a run). The extras hold more than the bootstrap (ECE, Brier, integrated Brier score),
    so the share bounds the bootstrap's from above.
    """
    from client.data import build_dataset
    from client.manifest import load_manifest
    from client.trainer import evaluate
    from simulations.cli import DEFAULT_PLAN, plan_for_run
    from simulations.membership import CaseLosses, attack_interval, trained_routes

    plan = validate_plan(plan_for_run(DEFAULT_PLAN, quick=False, dp=None, secure_sites=4))
    last = len(plan.stages) - 1
    (manifest,) = make_sites(
        work / "site", sites=1, seed=0, size=32, cases_per_site=40, pet_sites=1
    )
    site = load_manifest(manifest)
    model = UniconModel.from_plan(plan)
    tasks = {n: t for n, t in plan.tasks_until(last).items() if not t.self_supervised}
    cpu = torch.device("cpu")
    with_s: dict[str, float] = {}
    without_s: dict[str, float] = {}
    extras_s: dict[str, float] = {}
    cases: dict[str, int] = {}
    for modality in plan.modalities_until(last).values():
        dataset = build_dataset(site, split="test", modality=modality, tasks=tasks,
                                data=plan.data, cache_dir=work / "cache")  # fmt: skip
        cases[modality.name] = len(dataset)
        evaluate(model, dataset, tasks=tasks, device=cpu)  # warm the cache
        for _ in range(repeats):
            for enabled, best in ((True, with_s), (False, without_s)):
                store: dict[str, float] = {}
                with _extras_patched(store, enabled=enabled):
                    started = time.perf_counter()
                    evaluate(model, dataset, tasks=tasks, device=cpu)
                    elapsed = time.perf_counter() - started
                best[modality.name] = min(best.get(modality.name, math.inf), elapsed)
                for route, seconds in store.items():
                    extras_s[route] = min(extras_s.get(route, math.inf), seconds)
    rng = np.random.default_rng(0)
    strata = [CaseLosses(rng.random(25), rng.random(10)) for _ in range(4)]
    started = time.perf_counter()
    attack_interval(strata, name="bench")
    attack_s = (time.perf_counter() - started) * len(trained_routes(plan))
    out = simulate_out or Path(os.environ.get("UNICON_SIMULATE_OUT", "report"))
    runs = sorted((out / "work" / "registry" / "runs").glob("*/metrics.jsonl"))
    if runs:
        requests, source = evaluation_requests(runs[-1]), str(runs[-1])
    else:
        requests, source = [], "the default plan, 4 sites (upper bound)"
        for index, stage in enumerate(plan.stages):
            routes = [
                f"{t}@{m}" for t in plan.tasks_until(index) for m in plan.modalities_until(index)
            ]
            validated = stage.rounds // stage.validate_every if stage.validate_every else 0
            requests += [routes] * (4 * (1 + validated))
    run_s = sum(extras_s.get(r, 0.0) for routes in requests for r in routes) + attack_s
    wall = math.nan
    if (out / "results.json").is_file():
        methods: dict[str, Any] = json.loads((out / "results.json").read_text()).get("methods")
        first: dict[str, Any] = next(iter((methods or {}).values()), {})
        wall = float(first.get("wall_s") or math.nan)
    return {
        "test_cases": cases,
        "evaluate_s": with_s,
        "evaluate_without_extras_s": without_s,
        "extras_s_per_route": extras_s,
        "mia_bootstrap_s": attack_s,
        "requests": len(requests),
        "requests_from": source,
        "run_bootstrap_s": run_s,
        "simulate_wall_s": wall,
        "share_of_simulate": run_s / wall if wall > 0 else math.nan,
    }


def main(
    out: Path = Path("bench"),
    scale: Sequence[int] = (2, 10, 50, 100),
    *,
    system: bool = True,
    learning: bool = True,
    quick_learning: bool = False,
) -> dict[str, Any]:
    """Run the benchmarks and write ``out/results.json``."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if learning:
            results["learning"] = bench_learning(root / "learning", quick=quick_learning)
        if not system:
            return _finish(results, out)
        sites = [
            p.parent
            for p in make_sites(
                root / "sites", sites=5, seed=1, size=16, cases_per_site=8, pet_sites=2
            )
        ]
        console.print("upload bytes per stage …")
        results["upload"] = bench_upload(sites[:3], root / "upload")
        results["secagg"] = []
        for count in (5, 20):
            console.print(f"SecAgg+ vs plain at {count} sites …")
            group = (
                sites
                if count == 5
                else [
                    p.parent
                    for p in make_sites(
                        root / "sites20", sites=20, seed=2, size=16, cases_per_site=6, pet_sites=0
                    )
                ]
            )
            results["secagg"].append(bench_secagg(group, root / f"secagg-{count}"))
        results["scale"] = []
        for count in scale:
            console.print(f"scale: {count} sites …")
            group = [
                p.parent
                for p in make_sites(
                    root / f"scale{count}",
                    sites=count,
                    seed=3,
                    size=16,
                    cases_per_site=6,
                    pet_sites=0,
                )
            ]
            results["scale"].append(bench_scale(group, root / f"scale-{count}"))
        console.print("analytic head: IID and one class per site …")
        results["analytic"] = {
            "iid": bench_analytic(sites[:4], root / "analytic-iid"),
            "one_class_per_site": bench_analytic(
                _one_class_sites(root / "oneclass", 4), root / "analytic-one"
            ),
        }
        console.print("evaluation bootstrap: its share of make simulate …")
        results["bootstrap"] = bench_bootstrap_overhead(root / "bootstrap")
    return _finish(results, out)


def _finish(results: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if "learning" in results:
        _print_learning(results["learning"])
    if "upload" in results:
        _print(results)
    return results


def _print_learning(learning: dict[str, Any]) -> None:
    table = Table(title=f"learning benchmarks ({learning['scenario']}, in-process)")
    table.add_column("benchmark")
    table.add_column("figure")
    bwt, forgetting = learning["bwt"], learning["forgetting"]
    table.add_row(
        "forgetting: UNICON vs naive fine-tuning",
        f"BWT {bwt['unicon']:+.3f} vs {bwt['naive']:+.3f}; average forgetting "
        f"{forgetting['unicon']:.3f} vs {forgetting['naive']:.3f}",
    )
    for task, ratio in learning["federated_over_centralised"].items():
        final = learning["final"]
        table.add_row(
            f"federated / centralised, {task}",
            f"{final['unicon'][task]:.3f} / {final['centralised'][task]:.3f} = {ratio:.3f}",
        )
    for task, best in learning.get("unicon_minus_best_baseline", {}).items():
        table.add_row(
            f"UNICON - best continual baseline, {task}",
            f"{best['difference']:+.3f} (best: {best['method']} {best['value']:.3f})",
        )
    for task, ratio in learning.get("unicon_over_unet", {}).items():
        table.add_row(f"UNICON / central MONAI BasicUNet, {task}", f"{ratio:.3f}")
    for task, gain in learning.get("pet_gain", {}).items():
        per_site = ", ".join(f"{s} {v:+.3f}" for s, v in gain["per_site"].items())
        table.add_row(f"PET gain (vs no-PET route), {task}", f"{gain['mean']:+.3f} ({per_site})")
    for route, subtle in learning.get("pet_gain_subtle", {}).items():
        table.add_row(f"PET gain on lesions barely visible on CT, {route}", _subtle_row(subtle))
    for stage, fraction in learning.get("upload_fraction", {}).items():
        table.add_row(f"upload per site and round, {stage}", f"{fraction:.1%} of the model")
    for epsilon, metrics in learning["dp_utility"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k != "max_epsilon_spent")
        table.add_row(f"DP utility, ε = {'∞' if epsilon == 'inf' else epsilon}", shown)
    console.print(table)


def _subtle_row(subtle: Any) -> str:
    """One table cell of a :func:`simulations.subtle_lesions.subtle_lesion_gain` report."""
    if not isinstance(subtle, dict):
        return f"not computed: {subtle}"
    gain, pet, ablation, counts = (
        subtle["gain"],
        subtle["pooled"]["pet"],
        subtle["pooled"]["ablation"],
        subtle["counts"],
    )
    return (
        f"voxel recall {gain['subtle_recall']:+.3f} ({pet['subtle_recall']:.3f} vs "
        f"{ablation['subtle_recall']:.3f}), lesions detected {gain['subtle_detection']:+.3f} "
        f"({pet['subtle_detection']:.3f} vs {ablation['subtle_detection']:.3f}); "
        f"{counts['subtle_lesions']} lesions in {counts['subtle_cases']} of "
        f"{counts['cases']} test cases (Dice on all of them {gain['dice']:+.3f})"
    )


def _print(results: dict[str, Any]) -> None:
    table = Table(title="system benchmarks (in-process grid, tiny model, 16³)")
    table.add_column("benchmark")
    table.add_column("figure")
    upload = results["upload"]
    for stage, fraction in upload["fraction_of_full"].items():
        table.add_row(
            f"upload per round, {stage}",
            f"{upload['upload_bytes_per_round'][stage]:,.0f} B = {fraction:.1%} of "
            f"the full model ({upload['full_model_bytes']:,} B)",
        )
    for entry in results["secagg"]:
        table.add_row(
            f"SecAgg+ vs plain, {entry['sites']} sites",
            f"{entry['secure_s']:.2f} s vs {entry['plain_s']:.2f} s per round "
            f"(×{entry['ratio']:.2f})",
        )
    for entry in results["scale"]:
        table.add_row(
            f"scale, {entry['sites']} sites",
            f"first round {entry['first_round_s']:.2f} s (×{entry['overhead_first_round']:.2f} "
            f"the summed local training); steady state {entry['steady_round_s']:.2f} s/round "
            f"= ×{entry['steady_overhead']:.2f} the summed site training + evaluation; peak "
            f"RSS {entry['peak_rss_mib']:.0f} MiB",
        )
    for name, entry in results["analytic"].items():
        table.add_row(
            f"analytic vs pooled ridge, {name}",
            f"max |Δw| {entry['max_abs_difference']:.2e} over {entry['cases']} cases",
        )
    if "bootstrap" in results:
        boot = results["bootstrap"]
        table.add_row(
            "evaluation bootstrap + calibration, share of make simulate",
            f"{boot['run_bootstrap_s']:.3f} s over {boot['requests']} evaluation requests = "
            f"{boot['share_of_simulate']:.3%} of {boot['simulate_wall_s']:.0f} s",
        )
    console.print(table)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="UNICON benchmarks (prints a table).")
    parser.add_argument(
        "--only",
        choices=("system", "learning", "flower-scale"),
        default=None,
        help="flower-scale: tiny sites on Flower's simulation engine (not in make bench)",
    )
    parser.add_argument(
        "--sites-counts",
        default="10,50,100",
        help="site counts of --only flower-scale (comma list)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument(
        "--quick-learning",
        action="store_true",
        help="learning benchmarks on the quick scenario (minutes instead of about an hour)",
    )
    args = parser.parse_args()
    if args.only == "flower-scale":
        from simulations.flower_scale import main as flower_scale

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        counts = [int(c) for c in args.sites_counts.split(",") if c.strip()]
        console.print_json(json.dumps(flower_scale(args.out, counts)))
        raise SystemExit(0)
    main(
        args.out,
        system=args.only != "learning",
        learning=args.only != "system",
        quick_learning=args.quick_learning,
    )
