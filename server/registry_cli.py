"""``unicon model``: list, show and export the versions in a coordinator's registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.errors import CoordinatorError
from unicon_model.errors import UniconModelError

if TYPE_CHECKING:
    from server.registry import Registry

app = typer.Typer(help="Model registry: list, show and export versions.", no_args_is_help=True)
console = Console()

REGISTRY_ERRORS = (CoordinatorError, UniconModelError)
"""Errors that become a clear message and exit code 1 instead of a traceback."""

RegistryOption = Annotated[
    Path,
    typer.Option(
        "--registry",
        envvar="UNICON_REGISTRY",
        help="Registry directory (or set UNICON_REGISTRY).",
    ),
]


def _open(registry: Path) -> Registry:
    from server.registry import Registry

    if not (registry / "versions").is_dir():
        console.print(f"[red]{registry} is not a registry (no versions/ folder).")
        raise typer.Exit(code=1)
    return Registry(registry)


def _error(message: object) -> None:
    """Print an error verbatim (no markup, no wrapping, so paths stay whole)."""
    console.print(str(message), markup=False, style="red", soft_wrap=True)


def _fail(error: Exception) -> typer.Exit:
    _error(error)
    return typer.Exit(code=1)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(values.items())) or "-"


@app.command("ls")
def list_versions(registry: RegistryOption = Path("registry")) -> None:
    """Every version with its lineage: stage, sites, rounds, ε per site, metrics."""
    reg = _open(registry)
    table = Table(title=f"model versions in {registry}")
    for column in (
        "version",
        "plan",
        "stage",
        "parent",
        "sites",
        "rounds",
        "ε per site",
        "metrics",
        "parameters",
    ):
        table.add_column(column)
    problems: list[str] = []
    for version in reg.versions():
        try:
            manifest = reg.manifest(version)
        except REGISTRY_ERRORS as e:
            problems.append(str(e))
            table.add_row(version, "[red]damaged: see below")
            continue
        lineage = manifest.lineage
        table.add_row(
            version,
            lineage.plan,
            lineage.stage,
            lineage.parent or "-",
            "\n".join(lineage.sites) or "-",
            str(lineage.rounds),
            _fmt(lineage.epsilon),
            _fmt(lineage.metrics).replace(", ", "\n"),
            f"{manifest.parameters:,}",
        )
    console.print(table)
    if problems:
        for problem in problems:
            _error(problem)
        raise typer.Exit(code=1)


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0002-prognosis.")],
    registry: RegistryOption = Path("registry"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """One version: components (sizes, hashes), tasks, modalities and lineage."""
    reg = _open(registry)
    try:
        manifest = reg.manifest(version)
    except REGISTRY_ERRORS as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(manifest.to_json())
        return
    table = Table(title=f"{version}: components")
    for column in ("component", "parameters", "bytes", "sha256"):
        table.add_column(column)
    for name, record in manifest.components.items():
        table.add_row(name, f"{record.parameters:,}", f"{record.bytes:,}", record.sha256[:16] + "…")
    console.print(table)
    console.print(json.dumps(manifest.lineage.model_dump(mode="json"), indent=2))


@app.command("export")
def export(
    version: Annotated[str, typer.Argument(help="Version id to export.")],
    out: Annotated[Path, typer.Argument(help="New folder for the inference package.")],
    registry: RegistryOption = Path("registry"),
) -> None:
    """Write a self-contained inference package (weights, manifest, predict.py, README)."""
    from server.export import export_version

    reg = _open(registry)
    try:
        path = export_version(reg, version, out)
    except REGISTRY_ERRORS as e:
        raise _fail(e) from e
    console.print(f"[green]exported {version} to {path}")
    console.print(f"try: python {path / 'predict.py'} --image ct=SCAN.nii.gz")
