"""Coordinator commands: ``unicon server start``, ``unicon plan launch``, ``unicon status``.

The ``server`` sub-application (:data:`app`), :func:`plan_launch` (``unicon plan launch``)
and :func:`status` (``unicon status``) are attached to the ``unicon`` command line by
:mod:`unicon_cli.main`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from server.errors import CoordinatorError
from server.superlink import (
    SuperLink,
    flower_environment,
    flower_executable,
    flwr_run,
    flwr_run_command,
    project_root,
    toml_table,
    write_connection,
)
from unicon_model.cli_output import (
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Cell,
    Column,
    emit_json,
    error,
    fitted_table,
)
from unicon_model.errors import PlanError, UniconModelError
from unicon_model.schema import Plan, load_plan, plan_to_dict, validate_plan

if TYPE_CHECKING:
    from server.registry import Registry

app = typer.Typer(help="Coordinator: start the SuperLink, register sites.", no_args_is_help=True)
console = Console()

RegistryOption = Annotated[
    Path,
    typer.Option("--registry", envvar="UNICON_REGISTRY", help="Registry directory."),
]


@app.command("start")
def start(
    state: Annotated[Path, typer.Option("--state", help="SuperLink state folder (database, log).")],
    certs: Annotated[
        Path | None,
        typer.Option("--certs", help="Folder from `unicon certs init` (TLS + node auth)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Listen address.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port for sites and `flwr run`.")] = 9093,
    insecure: Annotated[
        bool, typer.Option(help="Allow running without TLS (local tests only).")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Print the command instead of running it.")] = False,
) -> None:
    """Run the coordinator's SuperLink with TLS and SuperNode authentication."""
    if certs is None and not insecure:
        console.print("[red]give --certs DIR (from `unicon certs init`) or --insecure for tests")
        raise typer.Exit(code=2)
    try:
        link = SuperLink(state, host=host, port=port, certificates=certs)
    except CoordinatorError as e:
        console.print(f"[red]{e}")
        raise typer.Exit(code=1) from e
    console.print("[bold]" + " ".join(link.command))
    if dry_run:
        return
    link.start()
    assert link.process is not None
    console.print(f"[green]SuperLink pid {link.process.pid} listening on {host}:{port}")
    process = link.process
    # forward SIGTERM (systemd, docker stop) to the SuperLink; the wait below then returns
    signal.signal(signal.SIGTERM, lambda *_: process.send_signal(signal.SIGTERM))
    try:
        code = process.wait()
    except KeyboardInterrupt:
        link.stop()
        code = 0
    raise typer.Exit(code=code)


SuperlinkOption = Annotated[str, typer.Option(help="SuperLink address HOST:PORT.")]
RootCertificatesOption = Annotated[
    Path | None, typer.Option(help="CA certificate of the SuperLink (TLS).")
]
StateOption = Annotated[
    Path, typer.Option("--state", help="Folder for the CLI's connection settings.")
]


def _flwr_control(*args: str, superlink: str, root_certificates: Path | None, state: Path) -> int:
    """Run ``flwr ARGS unicon`` against the coordinator's SuperLink; return its exit code."""
    flwr_home = state.resolve() / "flwr-cli"
    write_connection(flwr_home, "unicon", superlink, root_certificates)
    command = [flower_executable("flwr"), *args, "unicon"]
    env = flower_environment(FLWR_HOME=str(flwr_home))
    return subprocess.run(command, env=env, check=False).returncode


@app.command("add-site")
def add_site(
    public_key: Annotated[Path, typer.Argument(help="The site's public key (NAME.pub).")],
    superlink: SuperlinkOption = "127.0.0.1:9093",
    root_certificates: RootCertificatesOption = None,
    state: StateOption = Path(".unicon"),
) -> None:
    """Register a site's public key so its SuperNode may join (wraps `flwr supernode register`)."""
    if not public_key.exists():
        console.print(f"[red]{public_key} does not exist (create it with `unicon certs site`)")
        raise typer.Exit(code=1)
    first = public_key.read_text().split(maxsplit=1)[0] if public_key.stat().st_size else ""
    if not first.startswith("ecdsa-sha2-"):
        console.print(
            f"[red]{public_key} is not an OpenSSH ECDSA public key (Flower rejects other "
            "kinds); create one with `unicon certs site NAME`"
        )
        raise typer.Exit(code=1)
    code = _flwr_control(
        "supernode",
        "register",
        str(public_key.resolve()),
        superlink=superlink,
        root_certificates=root_certificates,
        state=state,
    )
    if code != 0:
        console.print(f"[red]registration of {public_key} failed (flwr exit code {code})")
        raise typer.Exit(code=code)
    console.print(f"[green]registered {public_key}")


def _flwr_json(
    *args: str, superlink: str, root_certificates: Path | None, state: Path
) -> dict[str, Any]:
    """Run ``flwr ARGS --format json unicon``; return its JSON (``success`` false on failure)."""
    flwr_home = state.resolve() / "flwr-cli"
    write_connection(flwr_home, "unicon", superlink, root_certificates)
    command = [flower_executable("flwr"), *args, "--format", "json", "unicon"]
    env = flower_environment(FLWR_HOME=str(flwr_home))
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    try:
        parsed = json.loads(done.stdout)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        detail = (done.stderr or done.stdout).strip()[-500:] or f"exit code {done.returncode}"
        return {"success": False, "error-message": f"flwr printed no JSON: {detail}"}
    if done.returncode != 0 and parsed.get("success") is not False:
        parsed = {"success": False, "error-message": f"flwr exit code {done.returncode}"}
    return parsed


def site_rows(nodes: object) -> list[dict[str, Any]]:
    """``flwr supernode list`` JSON nodes as ``server sites --json`` entries (see README)."""
    rows = []
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        rows.append(
            {
                "node_id": str(node.get("node-id", "")),
                "owner": node.get("owner-name"),
                "status": node.get("status"),
                "registered_at": node.get("created-at"),
                "online_at": node.get("online-at"),
                "offline_at": node.get("offline-at"),
                "online_seconds": _real(node.get("online-elapsed")),
            }
        )
    return rows


@app.command("sites")
def sites(
    superlink: SuperlinkOption = "127.0.0.1:9093",
    root_certificates: RootCertificatesOption = None,
    state: StateOption = Path(".unicon"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (see README).")
    ] = False,
) -> None:
    """List the registered and connected SuperNodes (wraps `flwr supernode list`).

    Exit code 1 if the SuperLink cannot be asked.
    """
    if not as_json:
        code = _flwr_control(
            "supernode",
            "list",
            superlink=superlink,
            root_certificates=root_certificates,
            state=state,
        )
        raise typer.Exit(code=code)
    answer = _flwr_json(
        "supernode", "list", superlink=superlink, root_certificates=root_certificates, state=state
    )
    ok = answer.get("success") is True
    rows = site_rows(answer.get("nodes")) if ok else []
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["status"])] = counts.get(str(row["status"]), 0) + 1
    emit_json(
        {
            "superlink": superlink,
            "ok": ok,
            "error": None if ok else str(answer.get("error-message", "unknown error")),
            "sites": rows,
            "counts": counts,
        }
    )
    if not ok:
        _error(f"cannot list the sites of {superlink}: {answer.get('error-message')}")
        raise typer.Exit(code=EXIT_PROBLEMS)


def plan_launch(
    plan: Annotated[Path, typer.Argument(help="Plan file (TOML or JSON).")],
    registry: RegistryOption = Path("registry"),
    superlink: Annotated[
        str | None, typer.Option(help="SuperLink address HOST:PORT of the federation.")
    ] = None,
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate of the SuperLink (TLS).")
    ] = None,
    federation: Annotated[
        str | None,
        typer.Option(help="A SuperLink connection already in $FLWR_HOME/config.toml."),
    ] = None,
    stage: Annotated[str | None, typer.Option(help="Run only this stage.")] = None,
    site_wait: Annotated[float, typer.Option(help="Seconds to wait for eligible sites.")] = 120.0,
    evaluate_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for evaluation replies after a stage.")
    ] = 600.0,
    app_dir: Annotated[
        Path | None, typer.Option("--app", help="Flower app folder (default: this install).")
    ] = None,
    holdout_site: Annotated[
        list[str] | None,
        typer.Option(
            "--holdout-site",
            help="Keep this site out of all training and evaluate it apart after every stage "
            "(an unseen hospital); sets the plan's [evaluation] holdout_sites. Repeatable.",
        ),
    ] = None,
) -> None:
    """Launch a plan's pending stages on a federation (wraps `flwr run`).

    ``--holdout-site NAME`` launches a copy of the plan whose ``[evaluation] holdout_sites``
    is the given site(s) (``plan.json`` in the launch folder under the registry), replacing
    any the plan lists. The holdout is part of the plan's identity: a relaunch that resumes
    the run must give the same sites. A name that is not a valid site name exits 2; a
    name no connected site has is only known once the sites connect (the coordinator logs
    that the holdout site reported no evaluation).
    """
    try:
        parsed = load_plan(plan)
    except PlanError as e:
        console.print(f"[red]plan {plan} is invalid — {e}")
        raise typer.Exit(code=1) from e
    listed = list(parsed.evaluation.holdout_sites)
    if holdout_site and listed and listed != holdout_site:
        _error(
            f"--holdout-site {holdout_site} replaces the plan's holdout_sites {listed}", "yellow"
        )
    try:
        parsed = with_holdout_sites(parsed, holdout_site or [])
    except PlanError as e:
        _error(f"--holdout-site {' '.join(holdout_site or [])}: {e}")
        raise typer.Exit(code=EXIT_USAGE) from e
    if (superlink is None) == (federation is None):
        console.print("[red]give exactly one of --superlink HOST:PORT or --federation NAME")
        raise typer.Exit(code=2)
    registry = registry.resolve()
    registry.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="launch-", dir=registry))
    if holdout_site:
        plan = work / "plan.json"
        plan.write_text(json.dumps(plan_to_dict(parsed), indent=2))
        console.print(
            f"holding out {list(parsed.evaluation.holdout_sites)} (plan copy {plan})",
            markup=False,
            soft_wrap=True,
        )
    run_config: dict[str, str | int | float | bool] = {
        "plan": str(plan.resolve()),
        "registry": str(registry),
        "stage": stage or "",
        "site-wait": float(site_wait),
        "evaluate-timeout": float(evaluate_timeout),
    }
    config_path = work / "run-config.toml"
    config_path.write_text(toml_table(run_config))
    if superlink is not None:
        flwr_home = registry / ".flwr"
        write_connection(flwr_home, "unicon", superlink, root_certificates)
        connection = "unicon"
    else:
        flwr_home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
        connection = str(federation)
    command = flwr_run_command(
        app=app_dir or project_root(), connection=connection, run_config=config_path
    )
    console.print(f"launching plan {parsed.name} ({len(parsed.stages)} stage(s)) on {connection}")
    code = flwr_run(command, flwr_home=flwr_home)
    if code != 0:
        console.print(f"[red]flwr run exited with code {code}")
        raise typer.Exit(code=code)
    from server.registry import Registry

    try:
        _print_status(Registry(registry), parsed.name)
    except (CoordinatorError, UniconModelError) as e:
        _error(e)
        raise typer.Exit(code=1) from e


def with_holdout_sites(plan: Plan, sites: Sequence[str]) -> Plan:
    """``plan`` with ``[evaluation] holdout_sites`` set to ``sites`` (unchanged if empty).

    Raises
    ------
    PlanError
        If a name is not a valid site name or is repeated (every problem, naming
        ``evaluation.holdout_sites``).
    """
    if not sites:
        return plan
    raw = plan_to_dict(plan)
    raw["evaluation"] = {**(raw.get("evaluation") or {}), "holdout_sites": list(sites)}
    return validate_plan(raw, source="--holdout-site")


def _error(message: object, style: str = "red") -> None:
    """Print a message on stderr verbatim (no markup, no wrapping, so paths stay whole)."""
    error(message, style=style)


def _number(value: object, spec: str) -> str:
    """``value`` formatted with ``spec`` if it is a number, else ``-``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return "-"


def _real(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _numbers(values: object) -> dict[str, float]:
    """The entries of a mapping whose values are numbers (a damaged record gives ``{}``)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): v for k, v in ((k, _real(v)) for k, v in values.items()) if v is not None}


def _site_names(value: object) -> list[str]:
    return [str(s) for s in value] if isinstance(value, list) else []


@dataclass
class _StageRecords:
    """What ``metrics.jsonl`` says about one stage."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def _stage_records(registry: Registry, plan: str) -> dict[str, _StageRecords]:
    """The round and evaluation records of every stage, in the order stages appear."""
    log = registry.read_metrics(plan)
    for warning in log.warnings:
        _error(f"warning: {warning}", style="yellow")
    stages: dict[str, _StageRecords] = {}
    for record in log.records:
        stage = record.get("stage")
        if not isinstance(stage, str):
            continue
        if record.get("kind") == "round":
            stages.setdefault(stage, _StageRecords()).rounds.append(record)
        elif record.get("kind") == "evaluation":
            stages.setdefault(stage, _StageRecords()).evaluation = record
    return stages


def plan_status(registry: Registry, plan: str) -> dict[str, Any]:
    """A plan's progress and one summary per stage (``status --json``; keys in the README)."""
    from server.registry_cli import headline_metric

    progress = registry.progress(plan)
    records = _stage_records(registry, plan)
    names = [c.stage for c in progress.completed]
    if progress.current is not None and progress.current.stage not in names:
        names.append(progress.current.stage)
    rows: list[dict[str, Any]] = []
    previous: set[str] = set()
    for name in names:
        done = next((c for c in progress.completed if c.stage == name), None)
        found = records.get(name, _StageRecords())
        last = found.rounds[-1] if found.rounds else {}
        pooled = _numbers((found.evaluation or {}).get("pooled"))
        metric = headline_metric(pooled, previous)
        if metric is None and _real(last.get("val_score")) is not None:
            metric = ("val/score", float(last["val_score"]))
        if pooled:
            previous = set(pooled)
        worst = _worst((found.evaluation or {}).get("fairness"), metric[0] if metric else None)
        sites = _site_names(last.get("sites"))
        planned = _real(last.get("rounds"))
        round_ = _real(last.get("round"))
        if round_ is None and done is None and progress.current is not None:
            round_ = float(progress.current.round) or None
        rows.append(
            {
                "stage": name,
                "state": "done" if done else "in progress",
                "version": done.version if done else None,
                "sites": sites,
                "site_count": len(sites),
                "round": None if round_ is None else int(round_),
                "rounds": None if planned is None else int(planned),
                "loss": _real(last.get("loss")),
                "metric": metric[0] if metric else None,
                "metric_value": metric[1] if metric else None,
                "worst_site": worst[0] if worst else None,
                "worst": worst[1] if worst else None,
            }
        )
    return {**progress.model_dump(mode="json"), "stages": rows}


def _worst(fairness: object, route: str | None) -> tuple[str, float] | None:
    """The worst site of ``route`` and its metric, from an evaluation record's ``fairness``."""
    entry = fairness.get(route) if isinstance(fairness, dict) and route else None
    if not isinstance(entry, dict):
        return None
    site, value = entry.get("worst_site"), _real(entry.get("worst"))
    return (site, value) if isinstance(site, str) and value is not None else None


def _fairness_rows(fairness: object) -> dict[str, dict[str, Any]]:
    """``fairness`` of an evaluation record: route -> worst site, worst, best - worst gap."""
    out: dict[str, dict[str, Any]] = {}
    for route, entry in fairness.items() if isinstance(fairness, dict) else ():
        worst = _worst(fairness, route)
        if worst is not None:
            gap = _real(entry.get("gap"))
            out[str(route)] = {"worst_site": worst[0], "worst": worst[1], "gap": gap}
    return out


def stage_status(registry: Registry, plan: str, stage: str) -> dict[str, Any]:
    """One stage in full (``status --stage NAME --json``; keys in the README).

    Raises
    ------
    CoordinatorError
        The plan has no record of ``stage``, naming the stages it has.
    """
    summary = plan_status(registry, plan)
    row = next((r for r in summary["stages"] if r["stage"] == stage), None)
    if row is None:
        known = [r["stage"] for r in summary["stages"]]
        raise CoordinatorError(
            f"plan {plan!r} has no stage {stage!r} in {registry.root} (stages run so far: "
            f"{known}); see `unicon status --plan {plan}`"
        )
    found = _stage_records(registry, plan).get(stage, _StageRecords())
    epsilon: dict[str, float] = {}
    metrics: dict[str, float] = {}
    if row["version"] is not None:
        lineage = registry.manifest(row["version"]).lineage
        epsilon, metrics = dict(lineage.epsilon), dict(lineage.metrics)
    evaluation = found.evaluation or {}
    per_site = evaluation.get("per_site")
    recorded = evaluation.get("unseen")
    unseen: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    unseen_sites = unseen.get("per_site")
    return {
        "plan": plan,
        **row,
        "round_records": [
            {
                "round": _real(r.get("round")),
                "sites": _site_names(r.get("sites")),
                "loss": _real(r.get("loss")),
                "val_score": _real(r.get("val_score")),
                "wall_s": _real(r.get("wall_s")),
            }
            for r in found.rounds
        ],
        "pooled": _numbers(evaluation.get("pooled")),
        "per_site": {
            str(site): _numbers(values)
            for site, values in (per_site.items() if isinstance(per_site, dict) else ())
        },
        "fairness": _fairness_rows(evaluation.get("fairness")),
        "unseen": {
            "pooled": _numbers(unseen.get("pooled")),
            "per_site": {
                str(site): _numbers(values)
                for site, values in (unseen_sites.items() if isinstance(unseen_sites, dict) else ())
            },
        },
        "epsilon": epsilon,
        "lineage_metrics": metrics,
    }


STATUS_COLUMNS = (
    Column("stage"),
    Column("state"),
    Column("version", drop=3),
    Column("sites", justify="right", drop=1),
    Column("round", justify="right"),
    Column("loss", justify="right", drop=2),
    Column("metric"),
    Column("worst site"),
)
"""``status`` columns; the version column is the first to go on a narrow terminal."""


def _round_text(row: dict[str, Any]) -> str:
    if row["round"] is None:
        return "-"
    return f"{row['round']}/{row['rounds']}" if row["rounds"] else str(row["round"])


def _print_status(registry: Registry, plan: str) -> None:
    summary = plan_status(registry, plan)
    rows: list[list[Cell]] = [
        [
            row["stage"],
            row["state"],
            row["version"] or "-",
            str(row["site_count"]) if row["sites"] else "-",
            _round_text(row),
            _number(row["loss"], ".4g"),
            "-" if row["metric"] is None else f"{row['metric']} {row['metric_value']:.3f}",
            "-" if row["worst_site"] is None else f"{row['worst_site']} {row['worst']:.3f}",
        ]
        for row in summary["stages"]
    ]
    console.print(fitted_table(f"plan {plan}", STATUS_COLUMNS, rows, console.width))


def _print_stage(detail: dict[str, Any]) -> None:
    width = console.width
    facts = [
        ["plan", detail["plan"]],
        ["state", detail["state"]],
        ["version", detail["version"] or "-"],
        ["round", _round_text(detail)],
        ["sites", ", ".join(detail["sites"]) or "-"],
    ]
    console.print(
        fitted_table(
            f"stage {detail['stage']}", (Column(""), Column("")), facts, width, show_header=False
        )
    )
    rounds = [
        [
            _number(r["round"], ".0f"),
            str(len(r["sites"])),
            _number(r["loss"], ".4g"),
            _number(r["val_score"], ".3f"),
            _number(r["wall_s"], ".1f"),
        ]
        for r in detail["round_records"]
    ]
    console.print(
        fitted_table(
            "rounds",
            (
                Column("round", justify="right"),
                Column("sites", justify="right"),
                Column("loss", justify="right"),
                Column("val score", justify="right"),
                Column("seconds", justify="right"),
            ),
            rounds,
            width,
        )
    )
    values = [[route, "pooled", f"{v:.3f}"] for route, v in sorted(detail["pooled"].items())]
    for site, row in sorted(detail["per_site"].items()):
        values += [[route, site, f"{v:.3f}"] for route, v in sorted(row.items())]
    unseen = detail["unseen"]
    values += [[r, "unseen pooled", f"{v:.3f}"] for r, v in sorted(unseen["pooled"].items())]
    for site, row in sorted(unseen["per_site"].items()):
        values += [[r, f"{site} (unseen)", f"{v:.3f}"] for r, v in sorted(row.items())]
    console.print(
        fitted_table(
            "test metrics after the stage",
            (Column("task@modality"), Column("site"), Column("value", justify="right")),
            values,
            width,
        )
    )
    if detail["fairness"]:
        console.print(
            fitted_table(
                "fairness across sites (test)",
                (
                    Column("task@modality"),
                    Column("worst site"),
                    Column("worst", justify="right"),
                    Column("best − worst", justify="right"),
                ),
                [
                    [route, e["worst_site"], f"{e['worst']:.3f}", _number(e["gap"], ".3f")]
                    for route, e in sorted(detail["fairness"].items())
                ],
                width,
            )
        )
    if detail["epsilon"]:
        console.print(
            fitted_table(
                "privacy spent (ε per site)",
                (Column("site"), Column("ε", justify="right")),
                [[s, f"{e:.3g}"] for s, e in sorted(detail["epsilon"].items())],
                width,
            )
        )


def status(
    registry: RegistryOption = Path("registry"),
    plan: Annotated[str | None, typer.Option(help="Only this plan.")] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="Everything about one stage: rounds, sites, metrics per site, ε."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (see README).")
    ] = False,
) -> None:
    """Stages, rounds, sites and metrics so far, from the registry; one line per stage.

    Exit code 1 if the registry, a run file or the stage cannot be found or read.
    """
    from server.registry import Registry

    if not registry.is_dir():
        _error(f"{registry} does not exist: give the registry folder with --registry")
        raise typer.Exit(code=EXIT_PROBLEMS)
    try:
        reg = Registry(registry)
        plans = [plan] if plan else reg.plans()
        if stage is not None:
            if len(plans) != 1:
                _error(
                    f"{registry} holds {len(plans)} plan(s) {plans}: give --plan NAME with --stage"
                )
                raise typer.Exit(code=EXIT_USAGE if plans else EXIT_PROBLEMS)
            detail = stage_status(reg, plans[0], stage)
            if as_json:
                emit_json(detail)
            else:
                _print_stage(detail)
            return
        if not plans:
            if as_json:
                emit_json({})
            else:
                console.print(f"no runs in {registry}", markup=False, highlight=False)
            return
        if as_json:
            emit_json({p: plan_status(reg, p) for p in plans})
            return
        for name in plans:
            _print_status(reg, name)
    except (CoordinatorError, UniconModelError) as e:
        _error(e)
        raise typer.Exit(code=EXIT_PROBLEMS) from e
