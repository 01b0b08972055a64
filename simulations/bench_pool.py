"""Run the learning benchmark's methods side by side in worker processes.

Each method's run is single-threaded work dominated by small 3D convolutions, which two
torch threads speed up far less than twofold; two runs in two processes of one thread each
use both cores fully. :func:`run_jobs` runs :class:`MethodJob` s in a pool of ``workers``
spawned processes (each pinned to one torch thread), or in this process one after the other
when ``workers`` is 1. The runs do not share state: each writes its own registry under its
job's ``work`` folder, and its wall time is measured in the process that ran it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.report import MethodResult

__all__ = ["MethodJob", "default_workers", "run_job", "run_jobs"]


@dataclass(frozen=True)
class MethodJob:
    """One method's run over the benchmark's sites.

    Attributes
    ----------
    key
        Where its result goes in :func:`run_jobs`' output.
    method
        ``unicon`` (the plan as given) or a baseline of
        :func:`simulations.baselines.run_baseline`.
    raw
        The UNICON plan (a baseline transforms it).
    work
        The folder its registries go under (``work/<method>/registry``).
    sites
        The site folders.
    folder
        A ``unicon`` run's folder name under ``work`` (default ``unicon``); baselines use
        their method's name.
    """

    key: str
    method: str
    raw: Mapping[str, Any]
    work: Path
    sites: tuple[Path, ...]
    folder: str = "unicon"


def default_workers() -> int:
    """Worker processes for the benchmark: 2, or 1 on a machine with a single core."""
    return max(1, min(2, os.cpu_count() or 1))


def run_job(job: MethodJob) -> MethodResult:
    """Run ``job`` here and return its result (its wall time on its own clock)."""
    from simulations.baselines import Clock, run_baseline, run_federated

    clock = Clock()
    raw = dict(job.raw)
    if job.method == "unicon":
        return run_federated(job.folder, raw, job.sites, job.work, clock.elapsed)
    return run_baseline(job.method, raw, job.sites, job.work, clock.elapsed)


def _single_thread() -> None:
    """Worker initialiser: one torch (and OpenMP) thread per worker process."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def run_jobs(
    jobs: Sequence[MethodJob],
    *,
    workers: int,
    progress: Callable[[str], None] = lambda _: None,
    runner: Callable[[MethodJob], MethodResult] = run_job,
) -> dict[str, MethodResult]:
    """Run every job, ``workers`` at a time, and return the results by job key.

    ``runner`` (a module-level function, as worker processes import it) runs one job;
    the default :func:`run_job`. A job that fails raises its error here once the jobs
    already running have finished; the jobs not yet started are cancelled.

    Raises
    ------
    ValueError
        If two jobs share a key or ``workers`` is below 1.
    """
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"job keys must be unique, got {keys}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        out = {}
        for job in jobs:
            progress(f"learning: {job.key} …")
            out[job.key] = runner(job)
        return out
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread)
    try:
        futures: dict[str, Future[MethodResult]] = {}
        for job in jobs:
            futures[job.key] = pool.submit(runner, job)
        progress(f"learning: {', '.join(keys)} in {workers} worker processes …")
        results = {}
        for key, future in futures.items():
            results[key] = future.result()
            progress(f"learning: {key} done ({results[key].wall_s:.0f} s)")
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)  # the jobs not started never run
        raise
    pool.shutdown(wait=True)
    return results
