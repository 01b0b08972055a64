"""What the evaluation's bootstrap intervals and calibration add to ``make simulate``.

:func:`bench_bootstrap_overhead` (``make bench``, see :mod:`simulations.bench`) times
:func:`client.trainer.evaluate` with and without its per-route extras
(:data:`EVALUATION_EXTRAS`) and the membership attack's bootstrap, and relates them to the
evaluation requests of a ``make simulate`` run (:func:`evaluation_requests`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulations.synthetic import make_sites
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, validate_plan

logger = logging.getLogger(__name__)

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
    from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run

    plan = validate_plan(plan_for_run(DEFAULT_PLAN, quick=False, dp=None, secure_sites=4))
    times = _time_evaluation(plan, work, repeats)
    attack_s = _attack_seconds(plan)
    out = simulate_out or Path(os.environ.get("UNICON_SIMULATE_OUT", "report"))
    requests, source = _run_requests(out, plan)
    run_s = sum(times.extras_s.get(r, 0.0) for routes in requests for r in routes) + attack_s
    wall = _simulate_wall(out)
    return {
        "test_cases": times.cases,
        "evaluate_s": times.with_s,
        "evaluate_without_extras_s": times.without_s,
        "extras_s_per_route": times.extras_s,
        "mia_bootstrap_s": attack_s,
        "requests": len(requests),
        "requests_from": source,
        "run_bootstrap_s": run_s,
        "simulate_wall_s": wall,
        "share_of_simulate": run_s / wall if wall > 0 else math.nan,
    }


@dataclass
class _EvaluateTimes:
    """Best seconds per modality with and without the extras, and the extras' per route."""

    cases: dict[str, int] = field(default_factory=dict)
    with_s: dict[str, float] = field(default_factory=dict)
    without_s: dict[str, float] = field(default_factory=dict)
    extras_s: dict[str, float] = field(default_factory=dict)


def _time_evaluation(plan: Plan, work: Path, repeats: int) -> _EvaluateTimes:
    """``evaluate`` of the plan's full model on one generated hospital's test cases, timed."""
    from client.data import build_dataset
    from client.manifest import load_manifest
    from client.trainer import evaluate

    last = len(plan.stages) - 1
    (manifest,) = make_sites(
        work / "site", sites=1, seed=0, size=32, cases_per_site=40, pet_sites=1
    )
    site = load_manifest(manifest)
    model = UniconModel.from_plan(plan)
    tasks = {n: t for n, t in plan.tasks_until(last).items() if not t.self_supervised}
    cpu = torch.device("cpu")
    times = _EvaluateTimes()
    for modality in plan.modalities_until(last).values():
        dataset = build_dataset(site, split="test", modality=modality, tasks=tasks,
                                data=plan.data, cache_dir=work / "cache")  # fmt: skip
        times.cases[modality.name] = len(dataset)
        evaluate(model, dataset, tasks=tasks, device=cpu)  # warm the cache
        for _ in range(repeats):
            for enabled, best in ((True, times.with_s), (False, times.without_s)):
                store: dict[str, float] = {}
                with _extras_patched(store, enabled=enabled):
                    started = time.perf_counter()
                    evaluate(model, dataset, tasks=tasks, device=cpu)
                    elapsed = time.perf_counter() - started
                best[modality.name] = min(best.get(modality.name, math.inf), elapsed)
                for route, seconds in store.items():
                    times.extras_s[route] = min(times.extras_s.get(route, math.inf), seconds)
    return times


def _attack_seconds(plan: Plan) -> float:
    """The membership attack's bootstrap: 4 sites x (25 members, 10 non-members) per route."""
    from simulations.membership import CaseLosses, attack_interval, trained_routes

    rng = np.random.default_rng(0)
    strata = [CaseLosses(rng.random(25), rng.random(10)) for _ in range(4)]
    started = time.perf_counter()
    attack_interval(strata, name="bench")
    return (time.perf_counter() - started) * len(trained_routes(plan))


def _run_requests(out: Path, plan: Plan) -> tuple[list[list[str]], str]:
    """The evaluation requests of the run in ``out``, else the plan's upper bound; and whence."""
    runs = sorted((out / "work" / "registry" / "runs").glob("*/metrics.jsonl"))
    if runs:
        return evaluation_requests(runs[-1]), str(runs[-1])
    requests: list[list[str]] = []
    for index, stage in enumerate(plan.stages):
        routes = [f"{t}@{m}" for t in plan.tasks_until(index) for m in plan.modalities_until(index)]
        validated = stage.rounds // stage.validate_every if stage.validate_every else 0
        requests += [routes] * (4 * (1 + validated))
    return requests, "the default plan, 4 sites (upper bound)"


def _simulate_wall(out: Path) -> float:
    """The first method's ``wall_s`` in ``out/results.json`` (NaN without one)."""
    wall = math.nan
    if (out / "results.json").is_file():
        methods: dict[str, Any] = json.loads((out / "results.json").read_text()).get("methods")
        first: dict[str, Any] = next(iter((methods or {}).values()), {})
        wall = float(first.get("wall_s") or math.nan)
    return wall


def bootstrap_figure(boot: dict[str, Any]) -> str:
    """The bootstrap row's figure; without a ``make simulate`` run to divide by, says so."""
    spent = f"{boot['run_bootstrap_s']:.3f} s over {boot['requests']} evaluation requests"
    wall = boot["simulate_wall_s"]
    if not wall > 0:  # NaN: no results.json of a make simulate run was found
        return (
            f"{spent}; no make simulate run to compare with (run make simulate first, or "
            "point UNICON_SIMULATE_OUT at its output folder)"
        )
    return f"{spent} = {boot['share_of_simulate']:.3%} of {wall:.0f} s"
