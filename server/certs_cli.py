"""``unicon certs``: create the federation's TLS certificates and site authentication keys.

``unicon certs init`` makes the coordinator's CA and SuperLink server certificate,
``unicon certs site NAME`` one site's SuperNode authentication key pair, and
``unicon certs show FILE`` summarises a certificate. The work is done by :mod:`server.certs`,
which needs only the ``cryptography`` package.
"""

from __future__ import annotations

import shlex
import stat
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.certs import (
    DAYS_RULE,
    SERVER_NAME_RULE,
    CertificatePaths,
    CertificateRequestError,
    create_site_key,
    describe_certificate,
    init_certificates,
)
from server.errors import CoordinatorError

app = typer.Typer(
    help="Certificates and keys for TLS and node authentication.", no_args_is_help=True
)
console = Console()

USAGE_EXIT_CODE = 2
"""Exit code when an option breaks its rule (nothing was written)."""


def _mode(path: Path) -> str:
    """``0600 -rw-------`` for a file."""
    st_mode = path.stat().st_mode
    return f"{stat.S_IMODE(st_mode):04o} {stat.filemode(st_mode)}"


def _q(path: Path) -> str:
    return shlex.quote(str(path))


def _print_init_summary(
    out: Path, server_name: str, paths: CertificatePaths, info: dict[str, Any]
) -> None:
    """Print the files ``certs init`` wrote, the server certificate's names and next steps."""
    table = Table(title=f"certificates in {out}")
    for column in ("file", "permissions", "purpose"):
        table.add_column(column)
    purposes = {
        paths.ca_cert: "federation CA certificate: give it to every site",
        paths.ca_key: "CA private key: move it offline; never mount it into a container",
        paths.server_cert: "SuperLink TLS certificate",
        paths.server_key: "SuperLink TLS private key: keep secret",
    }
    for path, purpose in purposes.items():
        table.add_row(str(path), _mode(path), purpose)
    console.print(table)
    console.print(
        f"server certificate: CN {info['subject']}, valid until {info['not_valid_after']}"
    )
    console.print("subject alternative names: " + ", ".join(info["sans"]), highlight=False)
    console.print("[bold]next steps:")
    console.print(
        f"  move {_q(paths.ca_key)} offline: the SuperLink needs only ca.crt, server.pem "
        "and server.key",
        highlight=False,
    )
    console.print(
        f"  start the coordinator: unicon server start --certs {_q(out)}", highlight=False
    )
    console.print(
        f"  give the sites {_q(paths.ca_cert)} (their --root-certificates); "
        f"they must connect to {server_name}",
        highlight=False,
    )


@app.command("init")
def init(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for ca.crt, ca.key, server.pem, server.key.")
    ],
    server_name: Annotated[
        str,
        typer.Option(
            "--server-name",
            help=f"Name sites use to reach the SuperLink: {SERVER_NAME_RULE}.",
        ),
    ],
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="Extra IP address for the server certificate (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option("--days", help=f"Validity: {DAYS_RULE}.")] = 825,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing keys and certificates.")
    ] = False,
) -> None:
    """Create the federation CA and the SuperLink's TLS server certificate."""
    try:
        paths = init_certificates(
            out, server_name=server_name, ips=ip or (), days=days, overwrite=overwrite
        )
        info = describe_certificate(paths.server_cert)
    except CertificateRequestError as e:
        for problem in e.problems:
            console.print(problem, style="red", markup=False, highlight=False)
        raise typer.Exit(code=USAGE_EXIT_CODE) from e
    except CoordinatorError as e:
        console.print(f"[red]{e}", highlight=False)
        raise typer.Exit(code=1) from e

    _print_init_summary(out, server_name, paths, info)


@app.command("site")
def site(
    name: Annotated[str, typer.Argument(help="Site name; the private key's file name.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME and NAME.pub.")],
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing key pair (key rotation).")
    ] = False,
) -> None:
    """Create a site's SuperNode authentication key pair (ECDSA, OpenSSH format)."""
    try:
        paths = create_site_key(out, name, overwrite=overwrite)
    except CoordinatorError as e:
        console.print(f"[red]{e}", highlight=False)
        raise typer.Exit(code=1) from e
    table = Table(title=f"node authentication key of site {name}")
    for column in ("file", "permissions", "purpose"):
        table.add_column(column)
    table.add_row(
        str(paths.private_key), _mode(paths.private_key), "private key: the site keeps it"
    )
    table.add_row(
        str(paths.public_key), _mode(paths.public_key), "public key: the coordinator registers it"
    )
    console.print(table)
    console.print("[bold]next steps:")
    console.print(f"  coordinator: unicon server add-site {_q(paths.public_key)}", highlight=False)
    console.print(
        f"  site {name}: unicon site run --auth-key {_q(paths.private_key)} "
        "--root-certificates ca.crt --superlink HOST:PORT --manifest ... --state-dir ...",
        highlight=False,
    )
    if overwrite:
        console.print(
            "[yellow]if this replaced an existing key, register the new public key; "
            "the old one no longer matches."
        )


@app.command("show")
def show(
    file: Annotated[Path, typer.Argument(help="A certificate file (PEM or DER).")],
) -> None:
    """Summarise a certificate: names, validity, CA flag and fingerprint."""
    try:
        info = describe_certificate(file)
    except CoordinatorError as e:
        console.print(f"[red]{e}", highlight=False)
        raise typer.Exit(code=1) from e
    table = Table(title=str(file))
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key, value in info.items():
        shown = "\n".join(value) if isinstance(value, list) else str(value)
        table.add_row(key, shown or "-")
    console.print(table)
