"""``unicon simulate``: a whole federation on this machine, with a live view and a report.

- ``unicon simulate make-data --out DIR --sites N --seed S`` writes synthetic hospitals in
  the site format (NIfTI + manifest), read through the same pipeline a hospital uses.
- ``unicon simulate [--plan PLAN] [--sites DIR ...] [--out REPORT] [--quick] [--dp EPS]``
  runs a plan (default: the UNICON scenario over freshly generated data) on Flower's
  simulation engine with the real ServerApp and ClientApp (``--engine inprocess`` runs the
  same apps in this process, without Ray, for quick checks), shows stage/round/sites/loss
  while it runs, prints a summary table and writes the report (``report.md``,
  ``results.json``, PNG plots). ``--compare all`` (or a comma list) also runs the baselines
  of :mod:`simulations.baselines` on the same sites and reports them side by side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from typer.core import TyperGroup


class _SimulateGroup(TyperGroup):
    """``unicon simulate`` takes options; a stray word is explained, not "No such command"."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            raise click.UsageError(
                f"unexpected argument {args[0]!r}: `unicon simulate` takes options only, and "
                f"its one sub-command is {', '.join(sorted(self.commands))}. For several site "
                "folders repeat the option: --sites A --sites B (or pass one folder that "
                "holds the site folders).",
                ctx,
            )
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_SimulateGroup,
    help="Run a whole federation on this machine.",
    invoke_without_command=True,
    no_args_is_help=False,
)
console = Console()
logger = logging.getLogger(__name__)

DEFAULT_PLAN = Path(__file__).resolve().parents[1] / "examples" / "plans" / "unicon.toml"
QUICK = {
    "model": {"widths": [4, 8, 16], "adapter_rank": 2, "head_hidden": 8},
    "data": {"patch_size": [16, 16, 16], "augmentation": {}},
    "rounds": 2,
}
"""What ``--quick`` changes in the plan: a 3-level narrow encoder, 16³ patches, two rounds,
no augmentation (two rounds are too few to profit from it)."""


def _site_folders(paths: list[Path]) -> list[Path]:
    """Site folders from ``--sites`` (a site folder or a folder of them); one per site name."""
    from client.errors import SiteError
    from client.site_folder import MANIFEST_NAMES, check_unique_sites, find_manifest

    folders: list[Path] = []
    try:
        for path in paths:
            if not path.is_dir():
                raise typer.BadParameter(f"{path} is not a folder", param_hint="--sites")
            if find_manifest(path) is not None:
                folders.append(path)
                continue
            found = sorted(p for p in path.iterdir() if p.is_dir() and find_manifest(p))
            if not found:
                raise typer.BadParameter(
                    f"{path} holds no site folder with a manifest ({' or '.join(MANIFEST_NAMES)})",
                    param_hint="--sites",
                )
            folders += found
        check_unique_sites(folders)
    except SiteError as e:
        raise typer.BadParameter(str(e), param_hint="--sites") from e
    return folders


def _quiet_flower() -> None:
    """Flower's in-process logging follows ``UNICON_LOG_LEVEL`` (default WARNING).

    Flower sets its logger to DEBUG on import, so SecAgg+ and round chatter would otherwise
    scroll through the live view and the summary of an in-process simulation.
    """
    import flwr.supercore.logger  # noqa: F401  (creates and configures the "flwr" logger)

    level = os.environ.get("UNICON_LOG_LEVEL", "WARNING").upper()
    logging.getLogger("flwr").setLevel(
        level if level in logging.getLevelNamesMapping() else "WARNING"
    )


def plan_for_run(plan: Path, *, quick: bool, dp: float | None, secure_sites: int) -> dict[str, Any]:
    """The plan as run: ``--quick`` sizes, ``--dp`` at every stage, SecAgg+ fitted to the sites."""
    from unicon_model.schema import load_plan

    raw: dict[str, Any] = json.loads(load_plan(plan).model_dump_json())
    if quick:
        raw["model"].update(QUICK["model"])
        raw["data"].update(QUICK["data"])
        for stage in raw["stages"]:
            stage["rounds"] = QUICK["rounds"]
    for stage in raw["stages"]:
        stage["min_sites"] = min(stage["min_sites"], secure_sites)
        if stage.get("secure_aggregation") and secure_sites < stage["secagg"]["num_shares"]:
            stage["secagg"]["num_shares"] = max(secure_sites, 2)
            stage["secagg"]["reconstruction_threshold"] = min(
                stage["secagg"]["reconstruction_threshold"], max(secure_sites, 2)
            )
        if dp is not None:
            stage["privacy"] = {"mode": "local", "target_epsilon": dp}
    return raw


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


@app.callback()
def simulate(
    ctx: typer.Context,
    plan: Annotated[Path | None, typer.Option(help="Plan (default: the UNICON scenario).")] = None,
    sites: Annotated[
        list[Path] | None,
        typer.Option(
            help="Site folder, or a folder of site folders; repeat the option for more "
            "(--sites A --sites B). Each folder's manifest names a distinct site."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("report"),
    quick: Annotated[
        bool,
        typer.Option(
            help=f"Tiny model, 16³ patches, {QUICK['rounds']} rounds per stage, no augmentation "
            "(about a minute)."
        ),
    ] = False,
    dp: Annotated[
        float | None, typer.Option(help="DP-SGD at every site with this target ε per stage.")
    ] = None,
    engine: Annotated[
        str, typer.Option(help="flower (simulation engine) or inprocess (no Ray).")
    ] = "flower",
    seed: Annotated[int, typer.Option(help="Seed of the generated data.")] = 0,
    compare: Annotated[
        str | None,
        typer.Option(
            help="Also run baselines on the same sites: 'all' or a comma list of naive, ewc, "
            "lwf, centralised, local, no-pet, single-task, unet (in-process engine; unet: a "
            "MONAI BasicUNet per segmentation route, trained centrally)."
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the summary as JSON on stdout (see README); progress goes to stderr.",
        ),
    ] = False,
) -> None:
    """Run a plan over site folders (default: generated data) and write the report.

    Exit code 1 if the simulation fails, 2 for a wrong command line.
    """
    console.stderr = as_json  # with --json, stdout carries the JSON document alone
    if ctx.invoked_subcommand is not None:
        return
    from simulations.report import method_result, write_report
    from simulations.synthetic import make_sites
    from unicon_model.schema import validate_plan

    _quiet_flower()
    if engine not in {"flower", "inprocess"}:
        raise typer.BadParameter("--engine must be 'flower' or 'inprocess'")
    from simulations.baselines import BaselineError, parse_methods

    try:
        methods = parse_methods(compare) if compare else []
    except BaselineError as e:
        raise typer.BadParameter(str(e), param_hint="--compare") from e
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    if sites:
        folders = _site_folders(sites)
    else:
        size = 16 if quick else 32
        count = 40
        console.print(f"generating 4 synthetic hospitals ({size}³, ~{count} cases each) …")
        make_sites(work / "data", sites=4, seed=seed, size=size, cases_per_site=count, pet_sites=2)
        folders = _site_folders([work / "data"])
    raw = plan_for_run(plan or DEFAULT_PLAN, quick=quick, dp=dp, secure_sites=len(folders))
    parsed = validate_plan(raw)
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
            if engine == "flower":
                from simulations.flower_run import run_plan_in_simulation

                run_plan_in_simulation(
                    plan_path,
                    folders,
                    registry=registry,
                    state_root=work / "state",
                    work_dir=work / "flower",
                    quiet=True,
                )
            else:
                from server.coordinator import Coordinator
                from server.registry import Registry
                from simulations.inprocess import InProcessTransport, seeded_numpy

                with seeded_numpy(parsed.model.seed):
                    Coordinator(
                        parsed,
                        Registry(registry),
                        InProcessTransport(folders, work / "state"),
                        site_wait=0,
                    ).run()
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
    from server.registry import Registry

    reg = Registry(registry)
    rounds = [r for r in reg.metrics(parsed.name) if r.get("kind") == "round"]
    result = method_result("unicon", reg.results(parsed.name), rounds, wall)
    notes = [
        f"engine: {engine}; sites: {', '.join(f.name for f in folders)}",
        f"model versions: {', '.join(reg.versions())}",
        "R[stage, task]: pooled (case-weighted) test metric — accuracy for classification, "
        "C-index for survival, Dice for segmentation — of every task@modality learned so far",
    ]
    results = {"unicon": result}
    if methods:
        notes.append(f"baselines on the in-process engine: {', '.join(methods)}")
        results.update(_baselines(methods, raw, folders, work / "baselines"))
    write_report(out, parsed.name, results, notes)
    summary = Table(
        title=f"summary: {parsed.name}, R[stage, task] test, case-weighted mean of sites "
        f"({wall:.0f} s)"
    )
    summary.add_column("task@modality", no_wrap=True)
    for stage in result.stages:
        summary.add_column(f"after {stage}", justify="right")
    for j, task in enumerate(result.tasks):
        summary.add_row(task, *("-" if row[j] != row[j] else f"{row[j]:.3f}" for row in result.R))
    console.print(summary)
    epsilon = max(result.epsilon.values(), default=0.0)
    console.print(
        f"ACC {result.acc:.3f}  BWT {result.bwt:+.3f}  forgetting {result.forgetting:.3f}  "
        f"bytes up {sum(result.bytes_up.values()):,}  max ε {epsilon:.3g}"
    )
    if len(results) > 1:
        console.print(_methods_table(results))
    console.print(f"[green]report: {out / 'report.md'} (plots and results.json alongside)")
    if as_json:
        from unicon_model.cli_output import emit_json

        emit_json(
            summary_json(
                parsed.name,
                results,
                engine=engine,
                sites=[f.name for f in folders],
                versions=reg.versions(),
                report=out / "report.md",
            )
        )


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
    plan
        The plan's name.
    results
        Method name -> :class:`simulations.report.MethodResult`; ``unicon`` first.
    engine, sites, versions, report
        The engine, the site names, the registry's versions and the report file.
    """
    unicon = results["unicon"]
    epsilon = max(unicon.epsilon.values(), default=0.0)
    return {
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


@app.command("make-data")
def make_data(
    out: Annotated[Path, typer.Option(help="Folder for the site folders.")],
    sites: Annotated[int, typer.Option(help="Number of hospitals.")] = 4,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    size: Annotated[int, typer.Option(help="Volume edge in voxels.")] = 32,
    cases: Annotated[int, typer.Option(help="Mean cases per site.")] = 24,
    pet_sites: Annotated[int | None, typer.Option(help="Sites with PET (default half).")] = None,
    unlabelled: Annotated[
        int, typer.Option(min=0, help="Train cases per site with images and no label.")
    ] = 0,
) -> None:
    """Write synthetic hospitals (NIfTI volumes + site manifests)."""
    from simulations.synthetic import make_sites

    paths = make_sites(
        out,
        sites=sites,
        seed=seed,
        size=size,
        cases_per_site=cases,
        pet_sites=pet_sites,
        unlabelled_per_site=unlabelled,
    )
    for path in paths:
        console.print(f"  {path}")
    console.print(f"[green]{len(paths)} site(s) written under {out}")
