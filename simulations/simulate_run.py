"""How ``unicon simulate`` runs: the federation with a live view, the baselines, the report.

:func:`run_simulation` takes the command line's options (:class:`SimulateOptions`), settles the
sites and the plan (:mod:`simulations.simulate_setup`), runs the plan on the chosen engine in
a worker thread while :func:`_watch` shows its progress, runs the ``--compare`` baselines and
the membership attack, writes the report and prints the summary
(:mod:`simulations.simulate_summary`). Everything it prints goes to :data:`console`.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from simulations.simulate_setup import (
    GENERATED_UNLABELLED,
    check_options,
    checked_methods,
    plan_with_holdout,
    quiet_flower,
    site_folders,
)

if TYPE_CHECKING:
    from server.registry import Registry
    from simulations.report import MethodResult
    from unicon_model.schema import Plan

console = Console()
"""Where ``unicon simulate`` prints (to stderr with ``--json``: see :mod:`simulations.cli`)."""
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulateOptions:
    """The options of ``unicon simulate`` (see :func:`simulations.cli.simulate`)."""

    plan: Path | None
    sites: list[Path] | None
    out: Path
    quick: bool
    dp: float | None
    engine: str
    seed: int
    compare: str | None
    mia: bool
    as_json: bool
    holdout_site: str | None
    sites_count: int


def run_simulation(options: SimulateOptions) -> None:
    """Run a plan over site folders (default: generated data) and write the report.

    Raises
    ------
    typer.BadParameter
        For a wrong command line (before anything is written or removed).
    typer.Exit
        With code 1 if the simulation fails.
    """
    from server.registry import Registry
    from simulations.report import method_result, write_report
    from simulations.simulate_summary import print_summary, summary_json
    from unicon_model.routes import served_routes

    quiet_flower()
    if options.engine not in {"flower", "inprocess"}:
        raise typer.BadParameter("--engine must be 'flower' or 'inprocess'")
    methods = checked_methods(options.compare)
    folders, raw, parsed = _sites_and_plan(options)
    work = options.out / "work"
    wall = _run_watched(options.engine, raw, parsed, folders, work)
    reg = Registry(work / "registry")
    rounds = [r for r in reg.metrics(parsed.name) if r.get("kind") == "round"]
    result = method_result("unicon", reg.results(parsed.name), rounds, wall)
    served = served_routes(parsed)
    notes = _notes(options, folders, reg, served)
    results = {"unicon": result}
    if methods:
        notes.append(f"baselines on the in-process engine: {', '.join(methods)}")
        results.update(_baselines(methods, raw, folders, work / "baselines"))
    privacy = _privacy(parsed, reg, folders, result, attack=options.mia)
    write_report(options.out, parsed.name, results, notes, privacy=privacy, served=served)
    print_summary(parsed.name, results, wall=wall, report=options.out / "report.md", served=served)
    if options.as_json:
        from unicon_model.cli_output import emit_json

        emit_json(
            summary_json(
                parsed.name,
                results,
                engine=options.engine,
                sites=[f.name for f in folders],
                versions=reg.versions(),
                report=options.out / "report.md",
            )
        )


def _sites_and_plan(options: SimulateOptions) -> tuple[list[Path], dict[str, Any], Plan]:
    """Check the options, clear ``out/work``, generate the sites if needed; the plan as run.

    With ``--sites`` every check (the plan's included) runs before anything is written or
    removed; generated sites are written to ``out/work/data`` first.
    """
    folders, shifted = check_options(
        options.sites,
        options.sites_count,
        options.holdout_site,
        engine=options.engine,
        seed=options.seed,
    )
    if options.sites:  # every check before anything is written or removed
        raw, parsed = plan_with_holdout(
            options.plan, options.quick, options.dp, folders, options.holdout_site
        )
    options.out.mkdir(parents=True, exist_ok=True)
    work = options.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    if not options.sites:
        folders = _generate(options, work / "data", shifted=shifted)
        raw, parsed = plan_with_holdout(
            options.plan, options.quick, options.dp, folders, options.holdout_site
        )
    return folders, raw, parsed


def _generate(options: SimulateOptions, data: Path, *, shifted: bool) -> list[Path]:
    """Write ``--sites-count`` synthetic hospitals (and the shifted one) under ``data``."""
    from simulations.synthetic import make_sites

    size = 16 if options.quick else 32
    count = 40
    console.print(
        f"generating {options.sites_count + shifted} synthetic hospitals ({size}³, ~{count} "
        f"labelled and {GENERATED_UNLABELLED} unlabelled cases each) …"
    )
    make_sites(
        data,
        sites=options.sites_count,
        seed=options.seed,
        size=size,
        cases_per_site=count,
        pet_sites=max(options.sites_count // 2, 1),
        shifted_site=shifted,
        unlabelled_per_site=GENERATED_UNLABELLED,
    )
    return site_folders([data])


def _run_watched(
    engine: str, raw: dict[str, Any], parsed: Plan, folders: list[Path], work: Path
) -> float:
    """Run the plan in a worker thread under the live view; its wall time in seconds.

    Raises
    ------
    typer.Exit
        With code 1 if the run failed (the error is printed once the live view closes).
    """
    plan_path = work / "plan.json"
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps(raw, indent=2))
    registry = work / "registry"
    console.print(
        f"plan [bold]{parsed.name}[/bold]: {len(parsed.stages)} stage(s) over "
        f"{len(folders)} site(s) {[f.name for f in folders]} on the {engine} engine"
    )
    error: list[BaseException] = []
    started = time.perf_counter()

    def run() -> None:
        try:
            run_engine(engine, plan_path, parsed, folders, work)
        except BaseException as e:  # reported after the live view closes
            error.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    _watch(
        registry,
        parsed.name,
        [s.name for s in parsed.stages],
        {s.name: (1 if s.is_analytic else s.rounds) for s in parsed.stages},
        worker,
    )
    worker.join()
    wall = time.perf_counter() - started
    if error:
        console.print(f"[red]the simulation failed: {error[0]}")
        raise typer.Exit(code=1)
    return wall


def run_engine(engine: str, plan_path: Path, parsed: Plan, folders: list[Path], work: Path) -> None:
    """Run the plan on ``engine``: Flower's simulation engine, or in this process.

    Both use the registry ``work/registry`` and the sites' state under ``work/state``; the
    in-process run seeds NumPy's global state with the plan's model seed
    (:func:`simulations.inprocess_run.run_in_process`).
    """
    if engine == "flower":
        from simulations.flower_run import run_plan_in_simulation

        run_plan_in_simulation(
            plan_path,
            folders,
            registry=work / "registry",
            state_root=work / "state",
            work_dir=work / "flower",
            quiet=True,
        )
    else:
        from server.registry import Registry
        from simulations.inprocess_run import run_in_process

        registry = Registry(work / "registry")
        run_in_process(parsed, registry, folders, work / "state", seed=parsed.model.seed)


def _view(metrics: list[dict[str, Any]], stages: list[str], rounds: dict[str, int]) -> Table:
    table = Table(title="federation progress")
    for column in ("stage", "round", "sites", "loss", "test metrics (case-weighted)"):
        table.add_column(column)
    for stage in stages:
        done = [r for r in metrics if r.get("kind") == "round" and r.get("stage") == stage]
        evaluation = next(
            (r for r in metrics if r.get("kind") == "evaluation" and r.get("stage") == stage), None
        )
        last = done[-1] if done else {}
        loss = last.get("loss")
        table.add_row(
            stage,
            f"{len(done)}/{rounds[stage]}",
            str(len(last.get("sites", []))) if last else "-",
            f"{loss:.4f}" if isinstance(loss, float) else "-",
            ", ".join(f"{k} {v:.3f}" for k, v in sorted(evaluation["pooled"].items()))
            if evaluation
            else ("training…" if done else "waiting"),
        )
    return table


def _watch(
    registry: Path,
    plan_name: str,
    stages: list[str],
    rounds: dict[str, int],
    worker: threading.Thread,
) -> None:
    path = registry / "runs" / plan_name / "metrics.jsonl"
    with Live(_view([], stages, rounds), console=console, refresh_per_second=2) as live:
        while worker.is_alive():
            if path.exists():
                records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                live.update(_view(records, stages, rounds))
            time.sleep(0.5)
        if path.exists():
            records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            live.update(_view(records, stages, rounds))


def _notes(
    options: SimulateOptions, folders: list[Path], registry: Registry, served: dict[str, str]
) -> list[str]:
    """The notes at the top of the report: engine, sites, versions, what R is, the routes
    another route serves (``served``: :func:`unicon_model.routes.served_routes`), the
    holdout."""
    notes = [
        f"engine: {options.engine}; sites: {', '.join(f.name for f in folders)}",
        f"model versions: {', '.join(registry.versions())}",
        "R[stage, task]: pooled (case-weighted) test metric — accuracy for classification, "
        "C-index for survival, Dice for segmentation — of every task@modality learned so far",
    ]
    if served:
        notes.append(
            "routes no stage trains, served by the route their modality was initialised from "
            "(on its input channels): "
            + ", ".join(f"{route} by {source}" for route, source in served.items())
        )
    if options.holdout_site:
        notes.append(
            f"unseen hospital: {options.holdout_site} is held out of all training and evaluated "
            "after every stage; R and the fairness figures are over the other sites"
        )
    return notes


def _baselines(
    methods: list[str], raw: dict[str, Any], folders: list[Path], work: Path
) -> dict[str, Any]:
    """Run each baseline with a spinner and elapsed time; a failing one is reported, not fatal."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from simulations.baselines import Clock, run_baseline

    shutil.rmtree(work, ignore_errors=True)
    done: dict[str, Any] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for method in methods:
            task = progress.add_task(f"baseline {method}", total=1)
            clock = Clock()
            try:
                done[method] = run_baseline(method, raw, folders, work, clock.elapsed)
            except Exception as e:  # one baseline failing leaves the others and the report
                logger.exception("baseline %s failed", method)
                progress.console.print(f"[red]baseline {method} failed: {e}")
            progress.update(task, completed=1)
    return done


def _privacy(
    parsed: Plan, registry: Registry, folders: list[Path], result: MethodResult, *, attack: bool
) -> dict[str, Any]:
    """The report's privacy entry (the attack unless ``--no-mia``); prints the attack's AUCs."""
    from simulations.membership import simulation_privacy

    if attack:
        console.print("membership-inference attack on the final model …")
    privacy = simulation_privacy(
        parsed,
        registry,
        folders,
        epsilon=result.epsilon,
        bytes_up=result.bytes_up,
        bytes_down=result.bytes_down,
        attack=attack,
    )
    mia_aucs = (privacy.get("mia") or {}).items()
    attacked = {r: v["mia_auc"] for r, v in mia_aucs if v["mia_auc"] is not None}
    if attacked:
        console.print(
            "membership-inference AUC (0.5 = chance): "
            + ", ".join(f"{r} {v:.3f}" for r, v in attacked.items())
        )
    return privacy
