"""Coordinator commands: ``unicon server start``, ``unicon plan launch``, ``unicon status``.

The ``server`` sub-application (:data:`app`), :func:`plan_launch` (``unicon plan launch``)
and :func:`status` (``unicon status``) are attached to the ``unicon`` command line by
:mod:`unicon_cli.main`. What ``status`` reports is built by :mod:`server.run_status` and
printed by :mod:`server.status_view`.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from server.errors import CoordinatorError
from server.launch import (
    flwr_connection,
    launch_folder,
    launch_run_config,
    with_holdout_sites,
    write_plan_copy,
    write_run_config,
)
from server.run_config import RunConfig, RunConfigError
from server.run_status import plan_status, real, stage_status
from server.status_view import STATUS_COLUMNS, print_stage, print_status
from server.superlink import (
    SuperLink,
    flower_environment,
    flower_executable,
    flwr_run,
    flwr_run_command,
    project_root,
    write_connection,
)
from unicon_model.cli_output import (
    EXIT_PROBLEMS,
    EXIT_USAGE,
    emit_json,
    error,
)
from unicon_model.errors import PlanError, UniconModelError
from unicon_model.schema import Plan, load_plan

if TYPE_CHECKING:
    from server.registry import Registry

__all__ = [
    "STATUS_COLUMNS",
    "add_site",
    "app",
    "console",
    "plan_launch",
    "plan_status",
    "site_rows",
    "sites",
    "stage_status",
    "start",
    "status",
    "with_holdout_sites",
]

app = typer.Typer(help="Coordinator: start the SuperLink, register sites.", no_args_is_help=True)
console = Console()

RUN_DEFAULTS = RunConfig()
"""Defaults of the ServerApp's run config (the defaults of ``unicon plan launch``)."""

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
                "online_seconds": real(node.get("online-elapsed")),
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


def _launch_plan(plan: Path, holdout_site: list[str] | None) -> Plan:
    """The plan to launch, with ``--holdout-site`` applied (exit 1 if invalid, 2 if misused)."""
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
    return parsed


def _connection_options(superlink: str | None, federation: str | None) -> None:
    """Exit 2 unless exactly one of ``--superlink`` and ``--federation`` is given."""
    if (superlink is None) == (federation is None):
        console.print("[red]give exactly one of --superlink HOST:PORT or --federation NAME")
        raise typer.Exit(code=2)


def _launch_numbers(site_wait: float, evaluate_timeout: float) -> None:
    """Exit 2 unless the waits are finite numbers >= 0 (checked before the launch folder)."""
    try:
        RunConfig(site_wait=site_wait, evaluate_timeout=evaluate_timeout)
    except RunConfigError as e:
        _error(e)
        raise typer.Exit(code=EXIT_USAGE) from e


def _holdout_copy(work: Path, parsed: Plan) -> Path:
    """Write the plan with its holdout sites as ``plan.json`` in ``work``; return its path."""
    plan = write_plan_copy(work, parsed)
    console.print(
        f"holding out {list(parsed.evaluation.holdout_sites)} (plan copy {plan})",
        markup=False,
        soft_wrap=True,
    )
    return plan


def _show_launched(registry: Path, name: str) -> None:
    """Print the status of the launched plan (exit 1 if the registry cannot be read)."""
    from server.registry import Registry

    try:
        _print_status(Registry(registry), name)
    except (CoordinatorError, UniconModelError) as e:
        _error(e)
        raise typer.Exit(code=1) from e


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
    stage: Annotated[str | None, typer.Option(help=RunConfig.help("stage"))] = None,
    site_wait: Annotated[
        float, typer.Option(help=RunConfig.help("site-wait"))
    ] = RUN_DEFAULTS.site_wait,
    evaluate_timeout: Annotated[
        float, typer.Option(help=RunConfig.help("evaluate-timeout"))
    ] = RUN_DEFAULTS.evaluate_timeout,
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
    parsed = _launch_plan(plan, holdout_site)
    _connection_options(superlink, federation)
    _launch_numbers(site_wait, evaluate_timeout)
    registry, work = launch_folder(registry)
    if holdout_site:
        plan = _holdout_copy(work, parsed)
    config = launch_run_config(plan, registry, stage, site_wait, evaluate_timeout)
    config_path = write_run_config(work, config)
    flwr_home, connection = flwr_connection(registry, superlink, root_certificates, federation)
    command = flwr_run_command(
        app=app_dir or project_root(), connection=connection, run_config=config_path
    )
    console.print(f"launching plan {parsed.name} ({len(parsed.stages)} stage(s)) on {connection}")
    code = flwr_run(command, flwr_home=flwr_home)
    if code != 0:
        console.print(f"[red]flwr run exited with code {code}")
        raise typer.Exit(code=code)
    _show_launched(registry, parsed.name)


def _error(message: object, style: str = "red") -> None:
    """Print a message on stderr verbatim (no markup, no wrapping, so paths stay whole)."""
    error(message, style=style)


def _print_status(registry: Registry, plan: str) -> None:
    """Print the status table of ``plan`` on :data:`console`."""
    print_status(registry, plan, console)


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
                print_stage(detail, console)
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
