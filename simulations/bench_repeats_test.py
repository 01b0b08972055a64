"""Repeated runs of the learning benchmark: means, Welch intervals, the runs' names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from simulations.bench_repeats import (
    repeat_jobs,
    repeat_summary,
    repeated_finals,
    welch_interval,
)
from simulations.report import MethodResult


def test_welch_interval_matches_scipy() -> None:
    # Prepare: two samples of unequal spread and size
    a, b = [0.70, 0.74, 0.69, 0.72], [0.66, 0.71, 0.60]

    # Execute
    difference, low, high = welch_interval(a, b)

    # Assert: scipy's Welch t-test gives the same difference and 95 % interval
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert difference == pytest.approx(np.mean(a) - np.mean(b))
    assert (low, high) == pytest.approx((reference.low, reference.high))


def test_welch_interval_is_nan_without_spread_or_with_one_run() -> None:
    assert welch_interval([0.5], [0.4, 0.3])[0] == pytest.approx(0.15)
    assert all(math.isnan(v) for v in welch_interval([0.5], [0.4, 0.3])[1:])
    assert all(math.isnan(v) for v in welch_interval([0.5, 0.5], [0.4, 0.4])[1:])


def test_repeat_summary_compares_unicon_with_the_baseline_of_the_best_mean() -> None:
    # Prepare: naive wins one run of lesion-seg but EWC has the better mean
    finals = {
        "unicon": [{"seg": 0.40, "surv": 0.70}, {"seg": 0.36, "surv": 0.72}],
        "naive": [{"seg": 0.45, "surv": 0.60}, {"seg": 0.25, "surv": math.nan}],
        "ewc": [{"seg": 0.38, "surv": 0.65}, {"seg": 0.37, "surv": 0.66}],
    }

    # Execute
    summary = repeat_summary(finals, ["seg", "surv"])

    # Assert: hand-computed means and sd; NaN runs left out
    assert summary["runs"] == {"unicon": 2, "naive": 2, "ewc": 2}
    assert summary["mean"]["naive"] == pytest.approx({"seg": 0.35, "surv": 0.60})
    assert summary["sd"]["ewc"]["seg"] == pytest.approx(math.sqrt(0.00005))
    assert "surv" not in summary["sd"]["naive"]
    seg = summary["unicon_minus_best_baseline"]["seg"]
    assert seg["method"] == "ewc"
    assert seg["difference"] == pytest.approx(0.38 - 0.375)
    assert (seg["low"], seg["high"]) == pytest.approx(
        welch_interval([0.40, 0.36], [0.38, 0.37])[1:]
    )
    assert seg["unicon"] == [0.40, 0.36]
    assert summary["unicon_minus_best_baseline"]["surv"]["method"] == "ewc"
    assert summary["unicon_minus_best_baseline"]["surv"]["difference"] == pytest.approx(0.055)


def _result(name: str, value: float) -> MethodResult:
    return MethodResult(
        name=name,
        stages=["s"],
        tasks=["seg"],
        R=[[value]],
        R_per_site={},
        acc=value,
        bwt=0.0,
        forgetting=0.0,
        bytes_up={},
        bytes_down={},
        epsilon={},
        wall_s=1.0,
        rounds=[],
    )


def test_repeat_jobs_rename_the_plan_per_run_and_finals_keep_the_first(tmp_path: Path) -> None:
    # Prepare
    raw = {"name": "plan", "stages": []}
    sites = [tmp_path / "a", tmp_path / "b"]

    # Execute
    jobs = repeat_jobs(raw, sites, tmp_path, ["unicon", "ewc"], repeats=3)

    # Assert: runs 2 and 3 of each method, under new plan names and folders of their own
    assert [(j.key, j.method, j.raw["name"], j.work) for j in jobs] == [
        ("unicon#seed2", "unicon", "plan-seed2", tmp_path / "seed2"),
        ("ewc#seed2", "ewc", "plan-seed2", tmp_path / "seed2"),
        ("unicon#seed3", "unicon", "plan-seed3", tmp_path / "seed3"),
        ("ewc#seed3", "ewc", "plan-seed3", tmp_path / "seed3"),
    ]
    assert all(j.sites == tuple(sites) for j in jobs)
    assert raw["name"] == "plan"
    assert repeat_jobs(raw, sites, tmp_path, ["unicon"], repeats=1) == []

    # Execute: the finals of run 1 (the benchmark's) and of the repeats, in run order
    first = {"unicon": _result("unicon", 0.5), "ewc": _result("ewc", 0.4)}
    results = {
        "unicon#seed2": _result("unicon", 0.1),
        "ewc#seed2": _result("ewc", 0.2),
        "unicon#seed3": _result("unicon", 0.3),
        "ewc#seed3": _result("ewc", 0.6),
    }
    finals = repeated_finals(first, results, repeats=3)

    # Assert
    assert [r["seg"] for r in finals["unicon"]] == pytest.approx([0.5, 0.1, 0.3])
    assert [r["seg"] for r in finals["ewc"]] == pytest.approx([0.4, 0.2, 0.6])
    assert set(finals) == {"unicon", "ewc"}
