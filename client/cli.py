"""``unicon site``: what a hospital's IT team runs.

- ``unicon site check MANIFEST``: validate the manifest and its files, print every problem
  and a per-task/per-modality summary; exit 1 on any error.
- ``unicon site audit --state-dir DIR``: verify the audit log's hash chain.
- ``unicon site run --superlink HOST:PORT --manifest M --state-dir D --root-certificates CA``:
  validate, then start ``flower-supernode`` with the node config the ClientApp reads. Without
  ``--root-certificates`` it refuses (exit 2) unless ``--insecure`` is given explicitly, which
  is logged as a warning: plaintext is never a silent fallback.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from unicon_model.cli_output import (
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Column,
    emit_json,
    error,
    fitted_table,
)

if TYPE_CHECKING:
    from client.audit import AuditEntry
    from client.manifest_check import ManifestReport

app = typer.Typer(
    help="Hospital site: check a manifest, audit, run the daemon.", no_args_is_help=True
)
console = Console()
logger = logging.getLogger(__name__)

USAGE_EXIT_CODE = EXIT_USAGE
"""Exit code of a refused command line (missing or conflicting options)."""

ManifestArg = Annotated[Path, typer.Argument(help="Site manifest (YAML or JSON).")]


REFUSED_EXIT_CODE = 77
"""Our exit code when the coordinator refuses this site (sysexits EX_NOPERM).

Flower reports an unregistered SuperNode as its code 305, which reaches the shell as
``305 % 256 == 49``; that status and the log lines below are mapped to this code."""
FLOWER_REFUSED_STATUS = 305 % 256
REFUSAL_MARKERS = ("Exit Code: 305", "Failed to activate SuperNode")
"""Lines of flower-supernode's log that mean the coordinator refused the site."""


def manifest_result(manifest: Path, report: ManifestReport) -> dict[str, Any]:
    """A manifest check as the ``site check --json`` document (keys in the README)."""
    parsed = report.manifest
    return {
        "manifest": str(manifest),
        "ok": report.ok,
        "site": parsed.site if parsed is not None else None,
        "cases": len(parsed.cases) if parsed is not None else None,
        "errors": [asdict(p) for p in report.errors],
        "warnings": [asdict(p) for p in report.warnings],
        "counts": report.counts,
    }


@app.command("check")
def check(
    manifest: ManifestArg,
    modalities: Annotated[
        str | None, typer.Option(help="Comma-separated modality names the plan knows.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (see README).")
    ] = False,
) -> None:
    """Validate a site manifest and its files; list every problem at once.

    A progress bar on stderr follows the reading of the images. Exit code 1 on any error
    (warnings alone exit 0).
    """
    from client.manifest_check import check_manifest

    known = [m.strip() for m in modalities.split(",")] if modalities else None
    report = check_manifest(manifest, known_modalities=known, progress=True)
    if as_json:
        emit_json(manifest_result(manifest, report))
        if not report.ok:
            raise typer.Exit(code=EXIT_PROBLEMS)
        return
    report.render(console)
    if not report.ok:
        error(f"{manifest}: errors found; fix them before joining a federation.")
        raise typer.Exit(code=EXIT_PROBLEMS)
    console.print(f"[green]{manifest} is valid.", highlight=False)


def _print_audit_entries(path: Path, shown: list[AuditEntry]) -> None:
    """Print the audit log entries ``shown`` as a table (nothing when there are none)."""
    rows = [
        [
            str(entry.seq),
            entry.time[:19],
            entry.event,
            str(entry.record.get("stage", "")),
            str(entry.record.get("round", "")),
            str(entry.record.get("epsilon", "")),
        ]
        for entry in shown
    ]
    if rows:
        columns = (
            Column("seq", justify="right"),
            Column("time (UTC)", drop=1),
            Column("event"),
            Column("stage"),
            Column("round", justify="right"),
            Column("ε", justify="right"),
        )
        console.print(fitted_table(f"audit log {path}", columns, rows, console.width))


@app.command("audit")
def audit(
    state_dir: Annotated[Path, typer.Option("--state-dir", help="The site's state directory.")],
    tail: Annotated[int, typer.Option(help="Show the last N entries.")] = 10,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (see README).")
    ] = False,
) -> None:
    """Verify the audit log's hash chain and show the latest entries; exit 1 if broken."""
    from client.audit import AuditLog

    path = state_dir / "audit.jsonl"
    log = AuditLog(path)
    result = log.verify()
    entries = list(log.entries()) if result.ok else []
    shown = entries[-tail:] if tail > 0 else []
    if as_json:
        emit_json(
            {
                "log": str(path),
                "ok": result.ok,
                "entries": result.entries,
                "unsigned": result.unsigned,
                "first_broken": result.first_broken,
                "reason": result.reason,
                "tail": [
                    {"seq": e.seq, "time": e.time, "event": e.event, "record": e.record}
                    for e in shown
                ],
            }
        )
        if not result.ok:
            raise typer.Exit(code=EXIT_PROBLEMS)
        return
    _print_audit_entries(path, shown)
    if not result.ok:
        error(f"chain broken at line {result.first_broken}: {result.reason}")
        raise typer.Exit(code=EXIT_PROBLEMS)
    extra = f" ({result.unsigned} unsigned, written before signing)" if result.unsigned else ""
    console.print(
        f"[green]chain intact and signed: {result.entries} entries{extra}.", highlight=False
    )


def _node_config(
    manifest: Path, state_dir: Path, policy: Path | None, max_message_mb: float | None
) -> str:
    """The ``--node-config`` value the ClientApp reads (absolute paths)."""
    node_config = f'manifest="{manifest.resolve()}" state-dir="{state_dir.resolve()}"'
    if policy is not None:
        node_config += f' policy="{policy.resolve()}"'
    if max_message_mb is not None:
        node_config += f" max-message-mb={float(max_message_mb)!r}"
    return node_config


def supernode_command(
    *,
    superlink: str,
    manifest: Path,
    state_dir: Path,
    policy: Path | None,
    root_certificates: Path | None,
    auth_key: Path | None,
    port: int,
    insecure: bool = False,
    max_message_mb: float | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for this site.

    Parameters
    ----------
    superlink, manifest, state_dir, policy, auth_key, port
        See ``unicon site run``.
    root_certificates : Path or None
        CA certificate of the coordinator: TLS on.
    insecure : bool
        Plaintext; only allowed, and required, when ``root_certificates`` is ``None``.
    max_message_mb : float or None
        The ClientApp's fixed bound on a request's array bytes (node config
        ``max-message-mb``; see :mod:`unicon_model.wire`).

    Returns
    -------
    list of str
        The command.

    Raises
    ------
    ValueError
        Neither or both of ``root_certificates`` and ``insecure``.
    """
    if (root_certificates is None) != insecure:
        raise ValueError(
            "give exactly one of root_certificates (TLS) and insecure=True (plaintext)"
        )
    executable = shutil.which("flower-supernode") or str(
        Path(sys.executable).with_name("flower-supernode")
    )
    node_config = _node_config(manifest, state_dir, policy, max_message_mb)
    command = [executable, "--superlink", superlink, "--node-config", node_config]
    command += ["--port", str(port)]
    if root_certificates is not None:
        command += ["--root-certificates", str(root_certificates)]
    else:
        command.append("--insecure")
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(auth_key)]
    return command


def _check_transport(superlink: str, root_certificates: Path | None, insecure: bool) -> None:
    """Refuse (exit 2) neither or both of TLS and ``--insecure``; warn loudly of plaintext."""
    if root_certificates is None and not insecure:
        console.print(
            "[red]refusing to connect without TLS: give --root-certificates CA.crt (the "
            "coordinator's CA certificate, from `unicon certs init`), or --insecure to run "
            "in plaintext on purpose (local tests only).",
            highlight=False,
        )
        raise typer.Exit(code=USAGE_EXIT_CODE)
    if root_certificates is not None and insecure:
        console.print(
            "[red]--root-certificates and --insecure contradict each other: give one.",
            highlight=False,
        )
        raise typer.Exit(code=USAGE_EXIT_CODE)
    if insecure:
        logger.warning(
            "site daemon runs WITHOUT TLS (--insecure): models, metrics and the node's "
            "identity travel in plaintext to %s",
            superlink,
        )
        console.print(
            f"[bold yellow]WARNING: --insecure: no TLS to {superlink}; everything sent "
            "travels in plaintext. Use --root-certificates outside local tests.",
            highlight=False,
        )


def _check_site_files(manifest: Path, policy: Path | None) -> None:
    """Check the manifest (exit 1 on errors, printing them) and load the policy, if any."""
    from client.manifest_check import check_manifest
    from client.policy import load_policy

    report = check_manifest(manifest)
    if not report.ok:
        report.render(console)
        console.print("[red]the manifest has errors; the daemon was not started.")
        raise typer.Exit(code=1)
    if policy is not None:
        load_policy(policy)


def _run_supernode(command: list[str]) -> int:
    """Run the SuperNode, relaying its log; its exit code, or ours for a refused site."""
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": os.environ.get("FLWR_TELEMETRY_ENABLED", "0"),
        # one log line per request served (stage, round, cases, seconds, ε so far)
        "UNICON_LOG_LEVEL": os.environ.get("UNICON_LOG_LEVEL", "INFO"),
    }
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    refused = threading.Event()

    def relay(stream: IO[str]) -> None:
        # pass the daemon's log through, watching for a refusal
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            if any(marker in line for marker in REFUSAL_MARKERS):
                refused.set()

    assert process.stdout is not None
    reader = threading.Thread(target=relay, args=(process.stdout,), daemon=True)
    reader.start()
    code = process.wait()
    # helpers the SuperNode started may hold the pipe open after it exits: do not wait for them
    reader.join(timeout=2.0)
    if code == FLOWER_REFUSED_STATUS or refused.is_set():
        console.print(
            "[red]the coordinator refused this site: its public key is not "
            "registered (ask the coordinator to run `unicon server add-site KEY.pub`)."
        )
        return REFUSED_EXIT_CODE
    return code


@app.command("run")
def run(
    superlink: Annotated[str, typer.Option(help="The coordinator's SuperLink, HOST:PORT.")],
    manifest: Annotated[Path, typer.Option(help="Site manifest.")],
    state_dir: Annotated[Path, typer.Option("--state-dir", help="Site state directory.")],
    policy: Annotated[Path | None, typer.Option(help="Site policy file.")] = None,
    root_certificates: Annotated[
        Path | None,
        typer.Option(help="CA certificate of the coordinator (TLS). Required unless --insecure."),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="Connect WITHOUT TLS (plaintext; local tests only). Logged as a warning.",
        ),
    ] = False,
    auth_key: Annotated[
        Path | None, typer.Option(help="The site's private key for node authentication.")
    ] = None,
    port: Annotated[int, typer.Option(help="Local port of the SuperNode's runtime API.")] = 9094,
    max_message_mb: Annotated[
        float | None,
        typer.Option(
            "--max-message-mb",
            min=1,
            help="Most MiB of arrays a request may carry (default: the plan's model size "
            "with headroom, capped at 2048).",
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the command instead of running it.")] = False,
) -> None:
    """Validate the manifest and policy, then run the site daemon (a Flower SuperNode)."""
    _check_transport(superlink, root_certificates, insecure)
    _check_site_files(manifest, policy)
    state_dir.mkdir(parents=True, exist_ok=True)
    command = supernode_command(
        superlink=superlink,
        manifest=manifest,
        state_dir=state_dir,
        policy=policy,
        root_certificates=root_certificates,
        auth_key=auth_key,
        port=port,
        insecure=insecure,
        max_message_mb=max_message_mb,
    )
    console.print("[bold]" + shlex.join(command))
    if dry_run:
        return
    code = _run_supernode(command)
    raise typer.Exit(code=code)
