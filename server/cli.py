"""Coordinator commands: ``unicon server start``, ``unicon plan launch``, ``unicon status``.

``plan launch`` and ``status`` are attached to the root CLI by :func:`register`; the
``server`` sub-application is attached by :mod:`unicon_model.cli`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

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
from unicon_model.errors import PlanError, UniconModelError
from unicon_model.schema import load_plan

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


@app.command("sites")
def sites(
    superlink: SuperlinkOption = "127.0.0.1:9093",
    root_certificates: RootCertificatesOption = None,
    state: StateOption = Path(".unicon"),
) -> None:
    """List the registered and connected SuperNodes (wraps `flwr supernode list`)."""
    code = _flwr_control(
        "supernode",
        "list",
        superlink=superlink,
        root_certificates=root_certificates,
        state=state,
    )
    raise typer.Exit(code=code)


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
) -> None:
    """Launch a plan's pending stages on a federation (wraps `flwr run`)."""
    try:
        parsed = load_plan(plan)
    except PlanError as e:
        console.print(f"[red]plan {plan} is invalid — {e}")
        raise typer.Exit(code=1) from e
    if (superlink is None) == (federation is None):
        console.print("[red]give exactly one of --superlink HOST:PORT or --federation NAME")
        raise typer.Exit(code=2)
    registry = registry.resolve()
    registry.mkdir(parents=True, exist_ok=True)
    run_config: dict[str, str | int | float | bool] = {
        "plan": str(plan.resolve()),
        "registry": str(registry),
        "stage": stage or "",
        "site-wait": float(site_wait),
        "evaluate-timeout": float(evaluate_timeout),
    }
    work = Path(tempfile.mkdtemp(prefix="launch-", dir=registry))
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


def _error(message: object, style: str = "red") -> None:
    """Print a message verbatim (no markup, no wrapping, so paths stay whole)."""
    console.print(str(message), markup=False, style=style, soft_wrap=True)


def _number(value: object, spec: str) -> str:
    """``value`` formatted with ``spec`` if it is a number, else ``-``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return "-"


def _print_status(registry: Registry, plan: str) -> None:
    progress = registry.progress(plan)
    table = Table(title=f"plan {plan}")
    for column in ("stage", "state", "version", "sites", "last round", "loss", "metrics"):
        table.add_column(column)
    log = registry.read_metrics(plan)
    for warning in log.warnings:
        _error(f"warning: {warning}", style="yellow")
    rounds: dict[str, dict[str, Any]] = {}
    evaluations: dict[str, dict[str, Any]] = {}
    for record in log.records:
        stage = record.get("stage")
        if not isinstance(stage, str):
            continue
        if record.get("kind") == "round":
            rounds[stage] = record
        elif record.get("kind") == "evaluation":
            evaluations[stage] = record
    names = [c.stage for c in progress.completed]
    if progress.current is not None and progress.current.stage not in names:
        names.append(progress.current.stage)
    for name in names:
        done = next((c for c in progress.completed if c.stage == name), None)
        last = rounds.get(name, {})
        pooled = evaluations.get(name, {}).get("pooled", {})
        pooled = pooled if isinstance(pooled, dict) else {}
        sites = last.get("sites", [])
        table.add_row(
            name,
            "done" if done else "in progress",
            done.version if done else "-",
            ", ".join(str(s) for s in sites) if isinstance(sites, list) and sites else "-",
            str(last.get("round", "-")),
            _number(last.get("loss"), ".4g"),
            "\n".join(f"{k} {_number(v, '.3f')}" for k, v in sorted(pooled.items())) or "-",
        )
    console.print(table)


def status(
    registry: RegistryOption = Path("registry"),
    plan: Annotated[str | None, typer.Option(help="Only this plan.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Stages, rounds, sites and metrics so far, from the registry."""
    from server.registry import Registry

    if not registry.is_dir():
        _error(f"{registry} does not exist: give the registry folder with --registry")
        raise typer.Exit(code=1)
    try:
        reg = Registry(registry)
        plans = [plan] if plan else reg.plans()
        if not plans:
            console.print(f"no runs in {registry}")
            return
        if as_json:
            typer.echo(
                json.dumps({p: reg.progress(p).model_dump(mode="json") for p in plans}, indent=2)
            )
            return
        for name in plans:
            _print_status(reg, name)
    except (CoordinatorError, UniconModelError) as e:
        _error(e)
        raise typer.Exit(code=1) from e


def register(root: typer.Typer, plan_app: typer.Typer) -> None:
    """Attach ``plan launch`` and ``status`` to the root CLI."""
    plan_app.command("launch")(plan_launch)
    root.command("status")(status)
