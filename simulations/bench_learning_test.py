"""The learning benchmark's scopes: which runs ``make bench`` and ``make bench-full`` start."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from simulations import bench_learning as module
from simulations import bench_pool
from simulations.bench_learning import LEARNING_METHODS, TARGET_METHODS, bench_learning
from simulations.bench_pool import MethodJob
from simulations.report import MethodResult
from simulations.simulate_setup import DEFAULT_PLAN, plan_for_run

TASKS = ["lesion-class@ct", "survival@ct"]


def _result(name: str, value: float) -> MethodResult:
    return MethodResult(
        name=name,
        stages=["classification", "prognosis"],
        tasks=TASKS,
        R=[[value, float("nan")], [value, value - 0.1]],
        R_per_site={},
        acc=value,
        bwt=0.0,
        forgetting=0.0,
        bytes_up={},
        bytes_down={},
        epsilon={"prognosis": 4.0},
        wall_s=1.0,
        rounds=[],
    )


def _scenario(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """Fake runs and extras; returns the lists that record the keys of the jobs submitted and
    the extra benchmarks called."""
    submitted: list[str] = []
    called: list[str] = []
    raw = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3)

    def run_jobs(
        jobs: Sequence[MethodJob], workers: int, progress: Callable[[str], None]
    ) -> dict[str, MethodResult]:
        submitted.extend(job.key for job in jobs)
        return {job.key: _result(job.key, 0.7) for job in jobs}

    def extra(name: str) -> Callable[..., dict[str, Any]]:
        def run(*args: Any) -> dict[str, Any]:
            called.append(name)
            return {"figure": name}

        return run

    monkeypatch.setattr(bench_pool, "run_jobs", run_jobs)
    monkeypatch.setattr(
        module, "learning_scenario", lambda work, quick, plan=None: ([], raw, "quick")
    )
    for name in ("_subtle_gain", "box_prompt_gain", "analytic_seg_gain"):
        monkeypatch.setattr(module, name, extra(name))
    return submitted, called


def test_targets_scope_runs_the_target_methods_and_no_extras(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted, called = _scenario(monkeypatch)

    result = bench_learning(tmp_path, quick=True, repeats=1, workers=1, extras=False)

    # one run of each target method, no analytic-seg variant, no DP run
    assert submitted == list(TARGET_METHODS)
    assert "analytic-seg" not in TARGET_METHODS and "unet" in TARGET_METHODS
    assert called == ["_subtle_gain"]
    assert result["scope"] == "targets"
    assert set(result["final"]) == set(TARGET_METHODS)
    assert not {"dp_utility", "box_prompts", "analytic_seg"} & set(result)
    assert result["pet_gain_subtle"] == {"figure": "_subtle_gain"}


def test_full_scope_adds_the_variant_dp_runs_and_extra_benchmarks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted, called = _scenario(monkeypatch)

    result = bench_learning(tmp_path, quick=True, repeats=1, workers=1, epsilons=(4.0,))

    assert submitted == [*LEARNING_METHODS, "dp4"]
    assert called == ["_subtle_gain", "box_prompt_gain", "analytic_seg_gain"]
    assert result["scope"] == "all"
    # DP utility: UNICON after prognosis (ε = ∞) next to the DP run's final metrics
    assert result["dp_utility"]["inf"] == pytest.approx(
        {"lesion-class@ct": 0.7, "survival@ct": 0.6}
    )
    assert result["dp_utility"]["4"]["max_epsilon_spent"] == 4.0


def test_learning_scenario_runs_another_plan_file_transformed_like_the_default(
    tmp_path: Path,
) -> None:
    """``--plan``: the learning comparison's plan comes from that file, shortened by
    ``--quick`` as the default plan is, and the caption names it."""
    import tomllib

    source = tomllib.loads(DEFAULT_PLAN.read_text())
    other = tmp_path / "renamed.toml"
    other.write_text(DEFAULT_PLAN.read_text().replace(source["name"], "another-plan", 1))

    sites, raw, scenario = module.learning_scenario(tmp_path / "w", quick=True, plan=other)

    assert raw["name"].startswith("another-plan")
    default = plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=len(sites))
    assert raw["stages"] == default["stages"]
    assert scenario.endswith("quick plan of renamed.toml")
