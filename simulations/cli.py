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
  ``--holdout-site NAME`` keeps one site out of all training and reports its test metrics
  after every stage next to the federation's (``unseen`` in ``results.json``); with the
  generated data, ``--holdout-site hospital-shifted`` adds a fifth site whose scanner lies
  outside the others' ranges (``make-data --shifted-site``).
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

GENERATED_UNLABELLED = 10
"""Unlabelled train cases per generated site (images only: the self-supervised stage's)."""
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


def site_capabilities(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """Site name -> the capabilities its manifest gives (no policy, no ε spent yet).

    What each in-process site will report when queried, read before anything runs, so a
    holdout site that leaves a stage short of ``min_sites`` is refused up front.
    """
    from client.manifest import load_manifest
    from client.site_folder import manifest_in

    out: dict[str, dict[str, Any]] = {}
    for folder in folders:
        manifest = load_manifest(manifest_in(folder))
        out[manifest.site] = {
            "site": manifest.site,
            "modalities": list(manifest.modalities),
            "counts": manifest.counts(),
            "policy": {},
            "epsilon": 0.0,
        }
    return out


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


def _plan_with_holdout(
    plan: Path | None, quick: bool, dp: float | None, folders: list[Path], holdout: str | None
) -> tuple[dict[str, Any], Any]:
    """The plan as run (:func:`plan_for_run`) with ``[evaluation] holdout_sites``, validated.

    ``min_sites`` and SecAgg+ are fitted to the training sites (those not held out).

    Raises
    ------
    typer.BadParameter
        With every problem of the holdout site (:func:`server.eligibility.holdout_problems`).
    """
    from server.eligibility import holdout_problems
    from unicon_model.schema import validate_plan

    training = len(folders) - (1 if holdout else 0)
    raw = plan_for_run(plan or DEFAULT_PLAN, quick=quick, dp=dp, secure_sites=max(training, 1))
    if holdout:
        raw["evaluation"] = {"holdout_sites": [holdout]}
    parsed = validate_plan(raw)
    if holdout:
        problems = holdout_problems(parsed, site_capabilities(folders))
        if problems:
            raise typer.BadParameter("; ".join(problems), param_hint="--holdout-site")
    return raw, parsed


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
    mia: Annotated[
        bool,
        typer.Option(
            "--mia/--no-mia",
            help="After the run, attack the final model with a loss-threshold membership "
            "inference per trained route (report section 'Privacy in practice').",
        ),
    ] = True,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the summary as JSON on stdout (see README); progress goes to stderr.",
        ),
    ] = False,
    holdout_site: Annotated[
        str | None,
        typer.Option(
            "--holdout-site",
            help="Keep this site out of all training and evaluate it after every stage as an "
            "unseen hospital (with generated data, 'hospital-shifted' adds a site with a "
            "scanner outside the others' ranges).",
        ),
    ] = None,
    sites_count: Annotated[
        int,
        typer.Option(
            "--sites-count",
            min=1,
            help="Number of generated hospitals (without --sites; half of them with PET). "
            "A count that would not fit in memory is refused up front with an estimate.",
        ),
    ] = 4,
) -> None:
    """Run a plan over site folders (default: generated data) and write the report.

    Exit code 1 if the simulation fails, 2 for a wrong command line (an unknown
    ``--holdout-site``, or one that leaves a stage fewer than its ``min_sites``).
    """
    console.stderr = as_json  # with --json, stdout carries the JSON document alone
    if ctx.invoked_subcommand is not None:
        return
    from simulations.report import method_result, write_report
    from simulations.synthetic import SHIFTED_SITE, make_sites, site_profiles

    _quiet_flower()
    if engine not in {"flower", "inprocess"}:
        raise typer.BadParameter("--engine must be 'flower' or 'inprocess'")
    from simulations.baselines import BaselineError, parse_methods

    try:
        methods = parse_methods(compare) if compare else []
    except BaselineError as e:
        raise typer.BadParameter(str(e), param_hint="--compare") from e
    shifted = not sites and holdout_site == SHIFTED_SITE
    if sites and sites_count != 4:
        raise typer.BadParameter(
            "--sites-count sets how many hospitals are generated; with --sites the folders "
            "given are the sites: drop one of the two options",
            param_hint="--sites-count",
        )
    from simulations.flower_run import memory_problem

    too_many = memory_problem(len(sites or []) if sites else sites_count + shifted, engine=engine)
    if too_many:
        raise typer.BadParameter(too_many + "; lower --sites-count", param_hint="--sites-count")
    if sites:
        folders = _site_folders(sites)
        names = list(site_capabilities(folders)) if holdout_site else []
    else:
        names = [p.name for p in site_profiles(sites_count, seed=seed)] + [SHIFTED_SITE] * shifted
    if holdout_site is not None and holdout_site not in names:
        raise typer.BadParameter(
            f"{holdout_site!r} is not among the sites {names}; name one of them"
            + ("" if sites else f" (or {SHIFTED_SITE!r} to add a site with a shifted scanner)"),
            param_hint="--holdout-site",
        )
    if sites:  # every check before anything is written or removed
        raw, parsed = _plan_with_holdout(plan, quick, dp, folders, holdout_site)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    if not sites:
        size = 16 if quick else 32
        count = 40
        console.print(
            f"generating {sites_count + shifted} synthetic hospitals ({size}³, ~{count} "
            f"labelled and {GENERATED_UNLABELLED} unlabelled cases each) …"
        )
        make_sites(
            work / "data",
            sites=sites_count,
            seed=seed,
            size=size,
            cases_per_site=count,
            pet_sites=max(sites_count // 2, 1),
            shifted_site=shifted,
            unlabelled_per_site=GENERATED_UNLABELLED,
        )
        folders = _site_folders([work / "data"])
        raw, parsed = _plan_with_holdout(plan, quick, dp, folders, holdout_site)
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
    if holdout_site:
        notes.append(
            f"unseen hospital: {holdout_site} is held out of all training and evaluated after "
            "every stage; R and the fairness figures are over the other sites"
        )
    results = {"unicon": result}
    if methods:
        notes.append(f"baselines on the in-process engine: {', '.join(methods)}")
        results.update(_baselines(methods, raw, folders, work / "baselines"))
    from simulations.membership import simulation_privacy

    if mia:
        console.print("membership-inference attack on the final model …")
    privacy = simulation_privacy(
        parsed,
        reg,
        folders,
        epsilon=result.epsilon,
        bytes_up=result.bytes_up,
        bytes_down=result.bytes_down,
        attack=mia,
    )
    mia_aucs = (privacy.get("mia") or {}).items()
    attacked = {r: v["mia_auc"] for r, v in mia_aucs if v["mia_auc"] is not None}
    if attacked:
        console.print(
            "membership-inference AUC (0.5 = chance): "
            + ", ".join(f"{r} {v:.3f}" for r, v in attacked.items())
        )
    write_report(out, parsed.name, results, notes, privacy=privacy)
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
    if result.holdout_sites:
        console.print(_unseen_table(result))
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
    shifted_site: Annotated[
        bool,
        typer.Option(
            "--shifted-site",
            help="Add one more site, hospital-shifted, whose CT gain, offset, noise and blur "
            "lie beyond the other sites' ranges (an unseen hospital for --holdout-site).",
        ),
    ] = False,
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
        shifted_site=shifted_site,
    )
    for path in paths:
        console.print(f"  {path}")
    console.print(f"[green]{len(paths)} site(s) written under {out}")
