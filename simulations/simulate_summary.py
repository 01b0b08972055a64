"""What ``unicon simulate`` prints at the end of a run, and its ``--json`` document."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from simulations.simulate_run import console

logger = logging.getLogger(__name__)


def print_summary(
    plan: str,
    results: dict[str, Any],
    *,
    wall: float,
    report: Path,
    served: Mapping[str, str] | None = None,
) -> None:
    """Print UNICON's R table and figures, the unseen hospital, the methods and the report.

    Parameters
    ----------
    plan
        The plan's name.
    results
        Method name -> :class:`simulations.report.MethodResult`; ``unicon`` first.
    wall
        The federation's wall time in seconds.
    report
        The ``report.md`` written.
    served
        Untrained route -> the route serving it (:func:`unicon_model.routes.served_routes`).
    """
    result = results["unicon"]
    summary = Table(
        title=f"summary: {plan}, R[stage, task] test, case-weighted mean of sites ({wall:.0f} s)"
    )
    summary.add_column("task@modality", no_wrap=True)
    for stage in result.stages:
        summary.add_column(f"after {stage}", justify="right")
    for j, task in enumerate(result.tasks):
        summary.add_row(task, *("-" if row[j] != row[j] else f"{row[j]:.3f}" for row in result.R))
    console.print(summary)
    if served:
        console.print(
            "no stage trains "
            + ", ".join(f"{route} (served by {source})" for route, source in served.items())
        )
    epsilon = max(result.epsilon.values(), default=0.0)
    console.print(
        f"ACC {result.acc:.3f}  BWT {result.bwt:+.3f}  forgetting {result.forgetting:.3f}  "
        f"bytes up {sum(result.bytes_up.values()):,}  max ε {epsilon:.3g}"
    )
    if result.holdout_sites:
        console.print(_unseen_table(result))
    if len(results) > 1:
        console.print(_methods_table(results))
    console.print(f"[green]report: {report} (plots and results.json alongside)")


def summary_json(
    plan: str,
    results: dict[str, Any],
    *,
    engine: str,
    sites: list[str],
    versions: list[str],
    report: Path,
) -> dict[str, Any]:
    """The ``simulate --json`` document (keys in the README).

    Parameters
    ----------
    plan, results
        As :func:`print_summary`.
    engine, sites, versions, report
        The engine, the site names, the registry's versions and the report file.
    """
    unicon = results["unicon"]
    epsilon = max(unicon.epsilon.values(), default=0.0)
    unseen = (
        {"holdout_sites": list(unicon.holdout_sites), "unseen": unicon.unseen}
        if unicon.holdout_sites
        else {}
    )
    return {
        **unseen,
        "plan": plan,
        "engine": engine,
        "sites": sites,
        "versions": versions,
        "wall_s": unicon.wall_s,
        "stages": list(unicon.stages),
        "tasks": list(unicon.tasks),
        "R": unicon.R,
        "acc": unicon.acc,
        "bwt": unicon.bwt,
        "forgetting": unicon.forgetting,
        "max_epsilon": epsilon,
        "bytes_up": sum(unicon.bytes_up.values()),
        "report": str(report),
        "methods": {
            name: {
                "acc": r.acc,
                "bwt": r.bwt,
                "forgetting": r.forgetting,
                "wall_s": r.wall_s,
            }
            for name, r in results.items()
        },
    }


def _unseen_table(result: Any) -> Table:
    """In-federation vs unseen-site test metric per stage and route (``--holdout-site``)."""
    from simulations.report import unseen_comparison

    table = Table(
        title=f"unseen hospital {', '.join(result.holdout_sites)} (never trained on) vs the "
        "federation, test"
    )
    table.add_column("after stage", no_wrap=True)
    table.add_column("task@modality", no_wrap=True)
    for name in ("federation", "unseen", "drop"):
        table.add_column(name, no_wrap=True, justify="right")
    for row in unseen_comparison(result):
        table.add_row(
            row["stage"],
            row["task"],
            f"{row['federation']:.3f}",
            f"{row['unseen']:.3f}",
            f"{row['drop']:+.3f}",
        )
    return table


def _methods_table(results: dict[str, Any]) -> Table:
    from simulations.report import final_metrics

    tasks = sorted({t for r in results.values() for t in r.tasks})
    finals = {name: final_metrics(r) for name, r in results.items()}
    table = Table(title="methods: final test metric per task (case-weighted mean of sites)")
    table.add_column("", no_wrap=True)
    for name in results:
        table.add_column(name, justify="right", no_wrap=True, min_width=max(len(name), 6))
    for task in tasks:
        table.add_row(task, *(f"{f[task]:.3f}" if task in f else "-" for f in finals.values()))
    table.add_row("ACC", *(f"{r.acc:.3f}" for r in results.values()))
    table.add_row("BWT", *(f"{r.bwt:+.3f}" for r in results.values()))
    table.add_row("forgetting", *(f"{r.forgetting:.3f}" for r in results.values()))
    table.add_row("wall s", *(f"{r.wall_s:.0f}" for r in results.values()))
    return table
