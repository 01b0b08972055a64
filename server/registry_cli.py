"""``unicon model``: list, show, gate and export the versions in a coordinator's registry.

The commands are here; a version's summary line is :mod:`server.registry_summary` and the
gate's checks are :mod:`server.registry_gate` (their names are importable from here too).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from server.errors import CoordinatorError
from server.registry_gate import (
    GATE_KINDS,
    GateUsageError,
    gate_checks,
    parse_thresholds,
    version_evaluation,
)
from server.registry_summary import headline_metric, version_summary
from unicon_model.cli_output import (
    EXIT_PROBLEMS,
    EXIT_USAGE,
    Cell,
    Column,
    emit_json,
    error,
    fitted_table,
)
from unicon_model.errors import UniconModelError

if TYPE_CHECKING:
    from server.registry import Registry
    from unicon_model.checkpoint import CheckpointManifest

__all__ = [
    "GATE_KINDS",
    "LS_COLUMNS",
    "REGISTRY_ERRORS",
    "GateUsageError",
    "app",
    "console",
    "export",
    "gate",
    "gate_checks",
    "headline_metric",
    "list_versions",
    "parse_thresholds",
    "show",
    "version_evaluation",
    "version_summary",
]

app = typer.Typer(
    help="Model registry: list, show, gate and export versions.", no_args_is_help=True
)
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
        _error(f"{registry} is not a registry (no versions/ folder).")
        raise typer.Exit(code=EXIT_PROBLEMS)
    return Registry(registry)


def _error(message: object) -> None:
    """Print an error on stderr verbatim (no markup, no wrapping, so paths stay whole)."""
    error(message)


def _fail(error: Exception) -> typer.Exit:
    _error(error)
    return typer.Exit(code=EXIT_PROBLEMS)


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in sorted(values.items())) or "-"


def _metric_text(metric: tuple[str, float] | None) -> str:
    return "-" if metric is None else f"{metric[0]} {metric[1]:.3f}"


LS_COLUMNS = (
    Column("version"),
    Column("plan", drop=5),
    Column("stage", drop=2),
    Column("parent", drop=1),
    Column("sites", justify="right"),
    Column("rounds", justify="right"),
    Column("max ε", justify="right"),
    Column("metric"),
    Column("parameters", justify="right", drop=4),
    Column("created", drop=3),
)
"""``model ls`` columns; at 80 columns: version, parent, sites, rounds, max ε, metric."""
_METRIC = [c.name for c in LS_COLUMNS].index("metric")


@app.command("ls")
def list_versions(
    registry: RegistryOption = Path("registry"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the versions as JSON (see README).")
    ] = False,
) -> None:
    """Every version on one line: stage, parent, sites, rounds, max ε and its own metric.

    The full lineage of a version (every site, ε per site, every metric) is in
    ``unicon model show VERSION``. Exit code 1 if a version cannot be read.
    """
    reg = _open(registry)
    problems: list[str] = []
    entries: list[dict[str, Any]] = []
    rows: list[list[Cell]] = []
    keys: dict[str, set[str]] = {}
    for version in reg.versions():
        try:
            manifest = reg.manifest(version)
        except REGISTRY_ERRORS as e:
            problems.append(str(e))
            row: list[Cell] = [version, *(["-"] * (len(LS_COLUMNS) - 1))]
            row[_METRIC] = Text("damaged (see below)", "red")
            rows.append(row)
            continue
        keys[version] = set(manifest.lineage.metrics)
        parent = manifest.lineage.parent
        before = keys.get(parent or "", set())
        entry = version_summary(version, manifest, before)
        entries.append(entry)
        epsilon = entry["max_epsilon"]
        rows.append(
            [
                version,
                entry["plan"] or "-",
                entry["stage"] or "-",
                parent or "-",
                str(entry["site_count"]),
                str(entry["rounds"]),
                "-" if epsilon is None else f"{epsilon:.3g}",
                _metric_text(headline_metric(manifest.lineage.metrics, before)),
                f"{manifest.parameters:,}",
                entry["created_at"][:10],
            ]
        )
    if as_json:
        emit_json({"registry": str(registry), "versions": entries, "problems": problems})
    else:
        title = f"model versions in {registry}"
        console.print(fitted_table(title, LS_COLUMNS, rows, console.width))
    if problems:
        for problem in problems:
            _error(problem)
        raise typer.Exit(code=EXIT_PROBLEMS)


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0002-prognosis.")],
    registry: RegistryOption = Path("registry"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """One version in full: lineage, ε per site, every metric, components (sizes, hashes)."""
    reg = _open(registry)
    try:
        manifest = reg.manifest(version)
    except REGISTRY_ERRORS as e:
        raise _fail(e) from e
    if as_json:
        typer.echo(manifest.to_json())
        return
    _print_version(version, manifest)


def _print_version(version: str, manifest: CheckpointManifest) -> None:
    """The tables of ``model show``: facts, ε per site, metrics, components."""
    lineage = manifest.lineage
    width = console.width
    facts = [
        ["plan", lineage.plan or "-"],
        ["stage", f"{lineage.stage or '-'} (index {lineage.stage_index})"],
        ["parent", lineage.parent or "-"],
        ["rounds", str(lineage.rounds)],
        ["created", lineage.created_at],
        ["parameters", f"{manifest.parameters:,} ({manifest.bytes:,} bytes)"],
        ["pretrained", lineage.pretrained.path if lineage.pretrained else "-"],
    ]
    console.print(
        fitted_table(
            f"version {version}", (Column(""), Column("")), facts, width, show_header=False
        )
    )
    sites = [[s, _epsilon_text(lineage.epsilon.get(s))] for s in lineage.sites]
    others = sorted(set(lineage.epsilon) - set(lineage.sites))  # sites that did not contribute
    sites += [[s, _epsilon_text(lineage.epsilon[s])] for s in others]
    console.print(
        fitted_table(
            f"sites: {len(lineage.sites)} contributed",
            (Column("site"), Column("ε spent", justify="right")),
            sites,
            width,
        )
    )
    console.print(
        fitted_table(
            "metrics (pooled, case-weighted)",
            (Column("metric"), Column("value", justify="right")),
            [[k, f"{v:.4g}"] for k, v in sorted(lineage.metrics.items())],
            width,
        )
    )
    console.print(
        fitted_table(
            "components",
            (
                Column("component"),
                Column("parameters", justify="right"),
                Column("bytes", justify="right", drop=1),
                Column("sha256 (first 16)", drop=2),
            ),
            [
                [name, f"{r.parameters:,}", f"{r.bytes:,}", r.sha256[:16]]
                for name, r in manifest.components.items()
            ],
            width,
        )
    )


def _epsilon_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


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
    files = sorted(p for p in path.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    console.print(
        f"exported {version} to {path}: {len(files)} file(s), {total:,} bytes",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    for file in files:
        console.print(
            f"  {file.relative_to(path)}  {file.stat().st_size:,} bytes",
            markup=False,
            highlight=False,
        )
    console.print(
        f"try: python {path / 'predict.py'} --image ct=SCAN.nii.gz",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


_GATE_OPTIONS = ("min", "max-gap", "min-unseen")
"""The gate's threshold options (without ``--``), in the order they are read."""


def _threshold_option(flag: str, text: str) -> Any:
    """A repeatable ``TASK=VALUE`` threshold option of ``model gate`` (help ``text``)."""
    return typer.Option(flag, metavar="TASK=VALUE", help=text)


def _thresholds(
    minimum: list[str] | None, max_gap: list[str] | None, min_unseen: list[str] | None
) -> dict[str, list[tuple[str, float]]]:
    """The gate's thresholds per kind; exit 2 (usage) naming every malformed one."""
    thresholds: dict[str, list[tuple[str, float]]] = {}
    problems: list[str] = []
    for kind, values in zip(_GATE_OPTIONS, (minimum, max_gap, min_unseen), strict=True):
        parsed, bad = parse_thresholds(kind, values or [])
        problems += bad
        if parsed:
            thresholds[kind] = parsed
    if not thresholds and not problems:
        problems.append("give at least one of --min, --max-gap, --min-unseen TASK=VALUE")
    if problems:
        for problem in problems:
            _error(problem)
        raise typer.Exit(code=EXIT_USAGE)
    return thresholds


def _checks(
    registry: Path, version: str, thresholds: dict[str, list[tuple[str, float]]]
) -> list[dict[str, Any]]:
    """Every check of the gate (exit 1 if the version cannot be read, 2 for a task it lacks)."""
    reg = _open(registry)
    try:
        evaluation = version_evaluation(reg, version)
    except REGISTRY_ERRORS as e:
        raise _fail(e) from e
    try:
        return gate_checks(version, evaluation, thresholds)
    except GateUsageError as e:
        _error(e)
        raise typer.Exit(code=EXIT_USAGE) from e


def _print_gate(version: str, checks: list[dict[str, Any]], failures: list[str]) -> None:
    """The table of ``model gate``: one line per check, its value and pass or FAIL."""
    rows: list[list[Cell]] = [
        [
            c["check"],
            c["route"],
            f"{c['threshold']:g}",
            "-" if c["value"] is None else f"{c['value']:.3f}",
            Text("pass", "green") if c["passed"] else Text("FAIL", "red"),
        ]
        for c in checks
    ]
    columns = (
        Column("check"),
        Column("task@modality"),
        Column("threshold", justify="right"),
        Column("value", justify="right"),
        Column("result"),
    )
    verdict = "passes" if not failures else f"fails {len(failures)} of {len(checks)} check(s)"
    console.print(fitted_table(f"gate {version}: {verdict}", columns, rows, console.width))


@app.command("gate")
def gate(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0004-pet.")],
    minimum: Annotated[
        list[str] | None,
        _threshold_option(
            "--min", "Pooled test metric of every route of TASK (or of TASK@MODALITY) >= VALUE."
        ),
    ] = None,
    max_gap: Annotated[
        list[str] | None, _threshold_option("--max-gap", "Best - worst site gap <= VALUE.")
    ] = None,
    min_unseen: Annotated[
        list[str] | None,
        _threshold_option("--min-unseen", "Metric on the held-out (unseen) site(s) >= VALUE."),
    ] = None,
    registry: RegistryOption = Path("registry"),
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the checks as JSON (see README).")
    ] = False,
) -> None:
    """Deployment gate: exit 1, with the reasons, if the version misses a threshold.

    Options repeat (--min lesion-class=0.7 --min survival=0.6). TASK is a task
    (every route of it) or one task@modality route. A value the version did
    not record fails the gate. Exit 0: every check passes; 1: one fails or the
    version cannot be read; 2: no threshold, a malformed one, or a task the
    version does not have.
    """
    thresholds = _thresholds(minimum, max_gap, min_unseen)
    checks = _checks(registry, version, thresholds)
    failures = [c["reason"] for c in checks if not c["passed"]]
    if as_json:
        emit_json(
            {"version": version, "passed": not failures, "checks": checks, "failures": failures}
        )
    else:
        _print_gate(version, checks, failures)
    for reason in failures:
        _error(reason)
    if failures:
        raise typer.Exit(code=EXIT_PROBLEMS)
