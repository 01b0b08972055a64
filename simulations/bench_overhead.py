"""Steady-state framework overhead at 10 sites, tiny vs realistic workload, in one run.

``python -m simulations.bench --only steady-overhead``: the measurement of ``make bench``'s
scale rows (:func:`simulations.bench_system.bench_scale`: one stage, the foundation stage of
:data:`simulations.bench_system.FOUNDATION`, every site in every round, the in-process grid,
which serves the sites one after another) on two workloads side by side:

- **tiny**: the bench's tiny model on 16³ cases, 6 per site (today's scale row);
- **default**: the default scenario's model (``examples/plans/unicon.toml`` ``[model]``) on
  32³ cases, 10 per site.

Per workload: the first round, the steady rounds (2 on) and their overhead as
:func:`simulations.bench_system.steady_state` defines it for a sequential engine: round wall
/ the sites' training + evaluation summed, and the largest *fixed* phases of a steady round
(every phase but the sites' ``train``/``eval`` and the coordinator's waits on them, which
contain the sites' whole serving), from the round records' ``timing`` (:mod:`server.timing`,
:mod:`client.timing`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.registry import Registry
from simulations.bench_only import progress, write_only_results
from simulations.bench_system import FOUNDATION, TINY_MODEL, steady_state
from simulations.inprocess_run import run_in_process
from simulations.synthetic import make_sites
from unicon_model.schema import validate_plan

__all__ = [
    "DEFAULT_PLAN",
    "WAIT_PHASES",
    "WORKLOADS",
    "Workload",
    "bench_steady_overhead",
    "default_model",
    "overhead_figure",
    "overhead_row",
    "overhead_table",
    "run_workload",
    "steady_overhead_only",
]

logger = logging.getLogger(__name__)

DEFAULT_PLAN = Path(__file__).resolve().parents[1] / "examples" / "plans" / "unicon.toml"
"""The default scenario's plan, whose ``[model]`` the ``default`` workload trains."""

WAIT_PHASES = frozenset(
    {"sites/train_s", "sites/eval_s", "coordinator/train_wait_s", "coordinator/evaluate_wait_s"}
)
"""Phases that are (or contain) the sites' useful work, left out of the fixed phases."""


@dataclass(frozen=True)
class Workload:
    """What the sites train in the measurement.

    Attributes
    ----------
    name
        Row label.
    model
        The plan's ``[model]`` table; ``None``: the default scenario's (:func:`default_model`).
    size
        Edge of the generated cubic cases and of the patch (voxels).
    cases_per_site
        Generated cases per site (all splits).
    rounds
        Rounds of the stage (at least 3: two steady rounds).
    """

    name: str
    model: Mapping[str, Any] | None
    size: int
    cases_per_site: int
    rounds: int


WORKLOADS = {
    "tiny": Workload("tiny", TINY_MODEL, size=16, cases_per_site=6, rounds=4),
    "default": Workload("default", None, size=32, cases_per_site=10, rounds=4),
}
"""The two workloads of ``--only steady-overhead``, in table order."""


def default_model() -> dict[str, Any]:
    """The ``[model]`` table of :data:`DEFAULT_PLAN`."""
    model: dict[str, Any] = tomllib.loads(DEFAULT_PLAN.read_text())["model"]
    return model


def run_workload(workload: Workload, work: Path, *, sites: int = 10) -> dict[str, Any]:
    """Generate ``sites`` hospitals under ``work``, run one stage and return its row.

    The sites come from :func:`simulations.synthetic.make_sites` (seed 3, no PET, as the
    bench's scale rows); the run is the in-process grid with NumPy's global state as it is.
    """
    folders = [
        p.parent
        for p in make_sites(
            work / "sites",
            sites=sites,
            seed=3,
            size=workload.size,
            cases_per_site=workload.cases_per_site,
            pet_sites=0,
        )
    ]
    model = dict(workload.model) if workload.model is not None else default_model()
    plan = validate_plan(
        {
            "name": f"steady-{workload.name}",
            "model": model,
            "data": {"patch_size": [workload.size] * 3},
            "stages": [{**FOUNDATION, "min_sites": 1, "rounds": workload.rounds}],
        }
    )
    registry = Registry(work / "registry")
    started = time.perf_counter()
    run_in_process(plan, registry, folders, work / "state", seed=None)
    stage_s = time.perf_counter() - started
    records = [r for r in registry.metrics(plan.name) if r["kind"] == "round"]
    return {
        "workload": workload.name,
        "model": model,
        "size": workload.size,
        "cases_per_site": workload.cases_per_site,
        "rounds": workload.rounds,
        "stage_s": stage_s,
        **overhead_row(records, sites=sites),
    }


def overhead_row(
    records: Sequence[Mapping[str, Any]], *, sites: int, top: int = 5
) -> dict[str, Any]:
    """The figures of one workload from its round records (sequential engine).

    Parameters
    ----------
    records
        The stage's ``kind: round`` records, with ``timing``.
    sites
        Sites in the run.
    top
        How many of the largest fixed phases to keep.

    Returns
    -------
    dict
        ``first_round_s``; ``steady_round_s``, ``steady_overhead`` and ``steady_phases`` of
        :func:`~simulations.bench_system.steady_state` (``workers=1``);
        ``site_work_s``: the sites' train + eval seconds per steady round (summed over sites,
        mean over rounds); ``fixed_s_per_site``: the rest of a steady round per site;
        ``largest_fixed``: the ``top`` largest phases outside :data:`WAIT_PHASES`, seconds
        per steady round, largest first.
    """
    first = [r["wall_s"] for r in records if r.get("round") == 1]
    steady = steady_state(records, workers=1)
    later = [r for r in records if r.get("round", 0) >= 2 and "timing" in r]
    work = [
        sum(p.get("train_s", 0.0) + p.get("eval_s", 0.0) for p in r["timing"]["sites"].values())
        for r in later
    ]
    site_work = sum(work) / len(work) if work else math.nan
    fixed = sorted(
        ((k, v) for k, v in steady["steady_phases"].items() if k not in WAIT_PHASES),
        key=lambda item: -item[1],
    )
    return {
        "sites": sites,
        "first_round_s": float(first[0]) if first else math.nan,
        **steady,
        "site_work_s": site_work,
        "fixed_s_per_site": (steady["steady_round_s"] - site_work) / sites,
        "largest_fixed": dict(fixed[:top]),
    }


def _label(row: Mapping[str, Any]) -> str:
    label = str(row["workload"])
    if "size" in row:
        label += f", {row['size']}³, {row['cases_per_site']} cases/site"
    return label


def _phases(row: Mapping[str, Any], count: int) -> str:
    """The ``count`` largest fixed phases: ``persist 0.13`` (a site phase, summed over sites)."""
    shown = list(row["largest_fixed"].items())[:count]
    return ", ".join(
        f"{name.removeprefix('sites/').removesuffix('_s')} {value:.2f}" for name, value in shown
    )


def overhead_table(rows: Sequence[Mapping[str, Any]], *, phases: int = 3) -> Any:
    """A rich table of :func:`run_workload`'s rows, one line per workload.

    The last column shows the ``phases`` largest fixed phases, seconds per steady round;
    site phases are summed over the sites, coordinator phases read ``coordinator/<name>``.
    """
    from rich.table import Table

    sites = {row["sites"] for row in rows}
    table = Table(title=f"steady-state overhead, {'/'.join(map(str, sorted(sites)))} sites "
                  "(in-process, one stage)")  # fmt: skip
    for column in ("workload", "1st round", "steady", "train+eval", "overhead", "largest fixed"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            _label(row),
            f"{row['first_round_s']:.2f} s",
            f"{row['steady_round_s']:.2f} s",
            f"{row['site_work_s']:.2f} s",
            f"×{row['steady_overhead']:.2f}",
            _phases(row, phases),
        )
    return table


def overhead_figure(row: Mapping[str, Any]) -> tuple[str, str]:
    """One row of ``make bench``'s system table (benchmark, figure) for a workload."""
    return (
        f"steady-state overhead, {row['sites']} sites, {_label(row)}",
        f"first round {row['first_round_s']:.2f} s; steady {row['steady_round_s']:.2f} s/round "
        f"= ×{row['steady_overhead']:.2f} the sites' train + eval ({row['site_work_s']:.2f} s); "
        f"largest fixed: {_phases(row, 3)}",
    )


def bench_steady_overhead(
    work: Path, workloads: Sequence[Workload] = tuple(WORKLOADS.values()), *, sites: int = 10
) -> dict[str, Any]:
    """Every workload at ``sites`` sites under ``work``, one after another.

    Returns ``{"rows": [...], "wall_s": ..., "torch_threads": ..., "load_before": ...,
    "load_after": ...}``: :func:`run_workload`'s rows, in order, the seconds all of them took
    (site generation included), torch's intra-op threads and the 1-minute load average
    before and after (the sites' training slows down many times over on busy cores, and
    the overhead then reads low).
    """
    import torch

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for workload in workloads:
        progress(f"steady-state overhead: {workload.name}, {sites} sites …")
        rows.append(run_workload(workload, work / workload.name, sites=sites))
    return {
        "rows": rows,
        "wall_s": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def steady_overhead_only(
    out: Path, workloads: Sequence[Workload] = tuple(WORKLOADS.values()), *, sites: int = 10
) -> dict[str, Any]:
    """``--only steady-overhead``: :func:`bench_steady_overhead` in a temporary folder.

    Writes ``out/results.json`` as ``{"steady_overhead": {"rows": [...], "wall_s": ...}}``
    (in ``make bench`` the same figures are ``steady_overhead``) and prints the table.
    """
    from simulations import bench

    with tempfile.TemporaryDirectory() as tmp:
        entry = bench_steady_overhead(Path(tmp), workloads, sites=sites)
    write_only_results(out, "steady_overhead", entry)
    bench.console.print(overhead_table(entry["rows"]))
    bench.console.print(
        f"wall time {entry['wall_s']:.0f} s; torch threads {entry['torch_threads']}; load "
        f"average (1 min) {entry['load_before']:.2f} before, {entry['load_after']:.2f} after"
    )
    return entry
