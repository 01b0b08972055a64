"""The learning benchmark's worker pool: every job run once, results by key, errors raised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from simulations.bench_pool import MethodJob, run_job, run_jobs
from simulations.report import MethodResult


def _fake_runner(job: MethodJob) -> MethodResult:
    """Stand-in for a method's run: its value says which job and which process ran it."""
    import torch

    if job.method == "broken":
        raise RuntimeError(f"job {job.key} failed")
    value = float(len(job.key)) + 0.5 * (job.raw["name"] == "plan")
    return MethodResult(
        name=job.method,
        stages=["s"],
        tasks=["t"],
        R=[[value]],
        R_per_site={},
        acc=float(os.getpid()),
        bwt=float(torch.get_num_threads()),
        forgetting=0.0,
        bytes_up={},
        bytes_down={},
        epsilon={},
        wall_s=0.0,
        rounds=[],
    )


def _jobs(tmp_path: Path) -> list[MethodJob]:
    raw = {"name": "plan"}
    return [MethodJob(key, "m", raw, tmp_path, ()) for key in ("a", "bb", "ccc")]


def test_run_jobs_in_this_process_one_after_the_other(tmp_path: Path) -> None:
    lines: list[str] = []
    results = run_jobs(_jobs(tmp_path), workers=1, progress=lines.append, runner=_fake_runner)
    assert {k: r.R[0][0] for k, r in results.items()} == {"a": 1.5, "bb": 2.5, "ccc": 3.5}
    assert {r.acc for r in results.values()} == {float(os.getpid())}
    assert lines == ["learning: a …", "learning: bb …", "learning: ccc …"]


def test_run_jobs_in_worker_processes_of_one_thread(tmp_path: Path) -> None:
    results = run_jobs(_jobs(tmp_path), workers=2, runner=_fake_runner)
    assert {k: r.R[0][0] for k, r in results.items()} == {"a": 1.5, "bb": 2.5, "ccc": 3.5}
    assert float(os.getpid()) not in {r.acc for r in results.values()}
    assert {r.bwt for r in results.values()} == {1.0}


def test_run_jobs_raises_a_failed_job_and_refuses_bad_arguments(tmp_path: Path) -> None:
    broken = [*_jobs(tmp_path), MethodJob("d", "broken", {"name": "plan"}, tmp_path, ())]
    with pytest.raises(RuntimeError, match="job d failed"):
        run_jobs(broken, workers=2, runner=_fake_runner)
    with pytest.raises(ValueError, match="unique"):
        run_jobs([*_jobs(tmp_path), *_jobs(tmp_path)], workers=1, runner=_fake_runner)
    with pytest.raises(ValueError, match="at least 1"):
        run_jobs(_jobs(tmp_path), workers=0, runner=_fake_runner)


def test_run_job_runs_unicon_in_its_folder_and_baselines_by_method(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations import baselines

    calls: list[tuple[str, str]] = []

    def federated(name: str, raw: dict[str, object], sites: object, work: Path, w: object) -> str:
        calls.append(("federated", name))
        return "u"

    def baseline(method: str, raw: dict[str, object], sites: object, work: Path, w: object) -> str:
        calls.append(("baseline", method))
        return "b"

    monkeypatch.setattr(baselines, "run_federated", federated)
    monkeypatch.setattr(baselines, "run_baseline", baseline)
    run_job(MethodJob("dp1", "unicon", {"name": "p"}, tmp_path, (), folder="dp1"))
    run_job(MethodJob("ewc", "ewc", {"name": "p"}, tmp_path, ()))
    assert calls == [("federated", "dp1"), ("baseline", "ewc")]
