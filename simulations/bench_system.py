"""System benchmarks of ``make bench``: upload, SecAgg+, scale and the analytic head.

See :mod:`simulations.bench` for what each measures. Tiny model, 16³ sites, every run
through the real coordinator and ClientApp on the in-process grid
(:func:`simulations.inprocess_run.run_in_process`, NumPy's global state not seeded).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.manifest import manifest_yaml
from client.site_folder import manifest_in, site_name, site_state_dir
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.inprocess_run import run_in_process
from simulations.synthetic import make_sites
from unicon_model.analytic import AnalyticHead
from unicon_model.components import component_sizes
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

logger = logging.getLogger(__name__)

TINY_MODEL = {"spatial_dims": 3, "widths": [4, 8, 16], "adapter_rank": 2, "head_hidden": 8}


def bench_plan(stages: list[dict[str, Any]], name: str) -> Plan:
    """The tiny model over 16³ patches with ``stages`` (plain dicts), validated."""
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
    transport = run_in_process(plan, registry, sites, work / "state", seed=None)
    return registry, transport


def bench_upload(sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Bytes uploaded per site per round in each stage vs the full model's size."""
    plan = bench_plan([FOUNDATION, PROGNOSIS, SEGMENTATION, PET], "upload")
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
        plan = bench_plan([stage], "secagg-secure" if secure else "secagg-plain")
        registry, _ = _run(plan, sites, work / f"secure-{secure}")
        walls = [r["wall_s"] for r in registry.metrics(plan.name) if r["kind"] == "round"]
        result["secure_s" if secure else "plain_s"] = float(np.mean(walls))
    result["ratio"] = result["secure_s"] / result["plain_s"]
    return result


def bench_scale(sites: Sequence[Path], work: Path, rounds: int = 3) -> dict[str, Any]:
    """First-round and steady-state round wall time, overhead and peak memory for one stage."""
    plan = bench_plan([{**FOUNDATION, "min_sites": 1, "rounds": rounds}], f"scale-{len(sites)}")
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
    plan = bench_plan([base, ridge], "analytic")
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


def one_class_sites(out: Path, count: int) -> list[Path]:
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
