"""Learning benchmarks of ``make bench`` on the default (or quick) UNICON scenario.

UNICON next to the baselines of :mod:`simulations.baselines` on the same generated
hospitals (forgetting, federated / centralised, the PET gain, UNICON over the MONAI
reference), DP utility at several ε, what a site uploads per round, the Dice gain of box
prompts on small lesions (:mod:`simulations.bench_prompts`) and the analytic segmentation
head vs the gradient one on the same frozen features (:mod:`simulations.bench_analytic_seg`); see
:mod:`simulations.bench`. Progress lines go to :data:`simulations.bench.console`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from simulations.synthetic import make_sites

if TYPE_CHECKING:
    from simulations.bench_pool import MethodJob
    from simulations.report import MethodResult

logger = logging.getLogger(__name__)

LEARNING_METHODS = (
    "unicon",
    "naive",
    "ewc",
    "lwf",
    "single-task",
    "centralised",
    "unet",
    "no-pet",
    "analytic-seg",
)
"""Methods of the learning benchmark, all on the same sites in one run."""

TARGET_METHODS = tuple(m for m in LEARNING_METHODS if m != "analytic-seg")
"""The methods behind issue 11's targets (``make bench-full``'s scope, ``extras=False``):
UNICON, the continual baselines, single-task, centralised, the MONAI reference and the
no-PET route; not the analytic-segmentation variant."""


def _progress(text: str) -> None:
    """Print a progress line on the benchmark's console.

    :data:`simulations.bench.console`, looked up at every call, so a console put in its
    place (a test recording the output) gets these lines too.
    """
    from simulations import bench

    bench.console.print(text)


def bench_learning(
    work: Path,
    *,
    quick: bool = False,
    epsilons: Sequence[float] = (1.0, 4.0, 8.0),
    repeats: int | None = None,
    workers: int | None = None,
    extras: bool = True,
    plan: Path | None = None,
) -> dict[str, Any]:
    """UNICON vs naive and centralised, and DP utility, on the default (or quick) scenario.

    The default scenario is ``make simulate``'s (4 hospitals, 32³, ~40 cases each); the quick
    one is ``--quick``'s plan over 3 hospitals of 16³ with ~40 cases each (minutes, not an
    hour, on 2 cores). Both add :data:`BENCH_EXTRA_TEST` test cases per site.

    ``repeats``: runs of UNICON and each continual baseline under other training seeds
    (:mod:`simulations.bench_repeats`; ``None``: :data:`QUICK_REPEATS` on the quick scenario,
    1 on the default one, whose runs take ~10 min each); the result's ``repeats`` holds
    their means and UNICON minus the best baseline with a 95 % interval. ``workers``: runs
    side by side in worker processes of one torch thread each
    (:func:`simulations.bench_pool.run_jobs`; ``None``: 2 on a machine with 2 cores or more).
    ``extras=False``: only the comparison behind issue 11's targets (:data:`TARGET_METHODS`,
    the PET gain on subtle lesions and the upload shares); no DP utility, analytic
    segmentation variant or benchmark, or box prompts (the result has no such keys, and
    its ``scope`` says ``"targets"``). ``plan``: a plan file to run instead of
    ``make simulate``'s (its scenario's ``plan_for_run`` transform applies as to the default).
    """
    from simulations.bench_pool import MethodJob, default_workers, run_jobs
    from simulations.bench_repeats import (
        REPEAT_METHODS,
        repeat_jobs,
        repeat_summary,
        repeated_finals,
    )
    from simulations.report import comparisons, final_metrics
    from unicon_model.routes import served_routes
    from unicon_model.schema import validate_plan

    if repeats is None:
        repeats = QUICK_REPEATS if quick else 1
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    sites, raw, scenario = learning_scenario(work, quick=quick, plan=plan)
    names = LEARNING_METHODS if extras else TARGET_METHODS
    jobs = [MethodJob(name, name, raw, work, tuple(sites)) for name in names]
    repeated_methods = [m for m in REPEAT_METHODS if m in names]
    jobs += repeat_jobs(raw, sites, work, repeated_methods, repeats=repeats)
    if extras:
        jobs += _dp_jobs(raw, sites, work, quick=quick, epsilons=epsilons, plan=plan)
    results = run_jobs(jobs, workers=workers or default_workers(), progress=_progress)
    methods = {name: results[name] for name in names}
    compared = comparisons(methods, served=served_routes(validate_plan(raw)))
    finals = repeated_finals(methods, results, repeats=repeats)
    repeated = repeat_summary(finals, list(final_metrics(methods["unicon"])))
    pet_subtle = _subtle_gain(raw, sites, work)
    out = _comparison(scenario, raw, methods, compared, pet_subtle, repeated)
    if not extras:
        return {**out, "scope": "targets"}
    return {
        **out,
        "scope": "all",
        "dp_utility": _dp_utility(methods["unicon"], results, epsilons),
        "box_prompts": box_prompt_gain(raw, sites, work),
        "analytic_seg": analytic_seg_gain(raw, sites, work),
    }


def _comparison(
    scenario: str,
    raw: Mapping[str, Any],
    methods: Mapping[str, MethodResult],
    compared: Mapping[str, Any],
    pet_subtle: dict[str, Any],
    repeated: dict[str, Any],
) -> dict[str, Any]:
    """The figures behind issue 11's targets, as :func:`bench_learning` returns them."""
    from simulations.report import final_metrics

    return {
        "scenario": scenario,
        "upload_fraction": upload_fractions(raw),
        "pet_gain": compared.get("pet_gain", {}),
        "pet_gain_subtle": pet_subtle,
        "unicon_over_unet": compared.get("unicon_over_unet", {}),
        "unicon_minus_best_baseline": compared.get("unicon_minus_best_baseline", {}),
        "analytic_seg_minus_best_baseline": compared.get("analytic_seg_minus_best_baseline", {}),
        "bwt": {n: m.bwt for n, m in methods.items()},
        "forgetting": {n: m.forgetting for n, m in methods.items()},
        "final": {n: final_metrics(m) for n, m in methods.items()},
        "wall_s": {n: m.wall_s for n, m in methods.items()},
        "federated_over_centralised": compared.get("federated_over_centralised", {}),
        "repeats": repeated,
    }


QUICK_REPEATS = 3
"""Runs per method (training seeds) of the quick learning benchmark's UNICON-vs-baselines
comparison: its single runs differ by as much as the methods do."""

BENCH_EXTRA_TEST = 50
"""Labelled test cases each benchmark site gets besides its ~40 (``make_sites``'s
``extra_test_per_site``): the same training data, a test split about five times larger, so
the side-by-side figures differ by more than their intervals' noise."""


def learning_scenario(
    work: Path, *, quick: bool, plan: Path | None = None
) -> tuple[list[Path], dict[str, Any], str]:
    """The learning benchmark's sites (generated under ``work/sites``), plan and its caption.

    Default: ``make simulate``'s 4 hospitals of 32³ and plan; quick: 3 hospitals of 16³ and
    the ``--quick`` plan; ~40 cases each and :data:`BENCH_EXTRA_TEST` more test cases, 2 PET
    sites. ``plan``: another plan file, transformed the same way (named in the caption).
    """
    from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run

    count, size = (3, 16) if quick else (4, 32)
    seed = 7 if quick else 0
    sites = [
        p.parent
        for p in make_sites(
            work / "sites",
            sites=count,
            seed=seed,
            size=size,
            cases_per_site=40,
            pet_sites=2,
            extra_test_per_site=BENCH_EXTRA_TEST,
        )
    ]
    raw = plan_for_run(plan or DEFAULT_PLAN, quick=quick, dp=None, secure_sites=len(sites))
    scenario = (
        f"{count} hospitals, {size}³, ~40 cases each + {BENCH_EXTRA_TEST} more test cases, "
        + ("quick plan" if quick else "default plan")
        + (f" of {plan.name}" if plan else "")
    )
    return sites, raw, scenario


def box_prompt_gain(raw: Mapping[str, Any], sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Dice with and without box prompts on small lesions
    (:func:`simulations.bench_prompts.bench_box_prompts`, run under ``work/box-prompts``);
    ``{"error": why}`` if it cannot run (the other figures are kept)."""
    from simulations.baselines import BaselineError
    from simulations.bench_prompts import bench_box_prompts

    _progress("learning: box prompts on lesions < 1 cm³ …")
    try:
        return bench_box_prompts(raw, sites, work)
    except (BaselineError, ValueError) as e:
        logger.warning("box prompts benchmark not run: %s", e)
        return {"error": str(e)}


def analytic_seg_gain(raw: Mapping[str, Any], sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """Analytic vs gradient segmentation head on the frozen encoder UNICON's segmentation
    stage started from (its run under ``work/unicon``; trained anew if absent)
    (:func:`simulations.bench_analytic_seg.bench_analytic_seg`, under ``work/analytic-seg``);
    ``{"error": why}`` if it cannot run (the other figures are kept)."""
    from simulations.baselines import BaselineError
    from simulations.bench_analytic_seg import (
        bench_analytic_seg,
        encoder_version,
        segmentation_stage,
    )

    _progress("learning: analytic vs gradient segmentation head …")
    try:
        seg = raw["stages"][segmentation_stage(raw)]["name"]
        try:
            encoder: Path | None = encoder_version(work / "unicon" / "registry", raw["name"], seg)
        except BaselineError:
            encoder = None
        return bench_analytic_seg(raw, sites, work / "analytic-seg", encoder=encoder)
    except (BaselineError, ValueError) as e:
        logger.warning("analytic segmentation benchmark not run: %s", e)
        return {"error": str(e)}


def _dp_jobs(
    raw: Mapping[str, Any],
    sites: Sequence[Path],
    work: Path,
    *,
    quick: bool,
    epsilons: Sequence[float],
    plan: Path | None = None,
) -> list[MethodJob]:
    """The stages up to prognosis with DP-SGD at each ε (keys and folders ``dp<ε>``)."""
    from simulations.bench_pool import MethodJob
    from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run

    prognosis = [stage["name"] for stage in raw["stages"]].index("prognosis")
    jobs = []
    for epsilon in epsilons:
        private = plan_for_run(
            plan or DEFAULT_PLAN, quick=quick, dp=epsilon, secure_sites=len(sites)
        )
        private["stages"] = private["stages"][: prognosis + 1]
        private["name"] = f"{raw['name']}-dp{epsilon:g}"
        key = f"dp{epsilon:g}"
        jobs.append(MethodJob(key, "unicon", private, work, tuple(sites), folder=key))
    return jobs


def _dp_utility(
    unicon: MethodResult, results: Mapping[str, MethodResult], epsilons: Sequence[float]
) -> dict[str, dict[str, float]]:
    """UNICON's metrics after prognosis (``inf``) next to the DP runs' (:func:`_dp_jobs`)."""
    from simulations.report import final_metrics

    dp: dict[str, dict[str, float]] = {}
    prognosis = unicon.stages.index("prognosis")
    dp["inf"] = {t: v for t, v in zip(unicon.tasks, unicon.R[prognosis], strict=True) if v == v}
    for epsilon in epsilons:
        result = results[f"dp{epsilon:g}"]
        dp[f"{epsilon:g}"] = final_metrics(result)
        dp[f"{epsilon:g}"]["max_epsilon_spent"] = max(result.epsilon.values(), default=0.0)
    return dp


def _subtle_gain(raw: Mapping[str, Any], sites: Sequence[Path], work: Path) -> dict[str, Any]:
    """PET gain on the subtle lesions (:mod:`simulations.subtle_lesions`) of the final UNICON
    and ``no-pet`` models that :func:`bench_learning` ran under ``work``; ``{"error": why}``
    if it cannot be computed (the other figures are kept)."""
    from simulations.baselines import BaselineError, final_model, without_new_inputs_plan
    from simulations.subtle_lesions import SubtleLesionError, pet_gain_subtle

    _progress("learning: PET gain on the lesions barely visible on CT …")
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
