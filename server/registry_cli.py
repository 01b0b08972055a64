"""``unicon model``: list, show, gate and export the versions in a coordinator's registry."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from server.errors import CoordinatorError
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
    from unicon_model.checkpoint import CheckpointManifest, Lineage

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


def headline_metric(
    metrics: Mapping[str, float], previous: Collection[str] = ()
) -> tuple[str, float] | None:
    """The metric a stage is about: its own ``task@modality`` route.

    Parameters
    ----------
    metrics
        Pooled metrics after the stage (``task@modality`` keys, plus ``val/...`` keys).
    previous
        The keys present before the stage (the parent version's, or the previous stage's
        evaluation): a route new in ``metrics`` is the stage's own task.

    Returns
    -------
    tuple of (str, float) or None
        The first new route (sorted), else the first route, else the validation score;
        ``None`` without any of them.
    """
    routes = sorted(k for k in metrics if "@" in k and "/" not in k)
    own = [k for k in routes if k not in previous] or routes
    if own:
        return own[0], float(metrics[own[0]])
    if "val/score" in metrics:
        return "val/score", float(metrics["val/score"])
    return None


def _metric_text(metric: tuple[str, float] | None) -> str:
    return "-" if metric is None else f"{metric[0]} {metric[1]:.3f}"


def _max_epsilon(lineage: Lineage) -> float | None:
    return max(lineage.epsilon.values()) if lineage.epsilon else None


def version_summary(
    version: str, manifest: CheckpointManifest, parent_metrics: Collection[str] = ()
) -> dict[str, Any]:
    """One version as a ``model ls --json`` entry (see the README for the keys)."""
    lineage = manifest.lineage
    metric = headline_metric(lineage.metrics, parent_metrics)
    return {
        "version": version,
        "plan": lineage.plan,
        "stage": lineage.stage,
        "parent": lineage.parent,
        "sites": list(lineage.sites),
        "site_count": len(lineage.sites),
        "rounds": lineage.rounds,
        "max_epsilon": _max_epsilon(lineage),
        "epsilon": dict(lineage.epsilon),
        "metric": metric[0] if metric else None,
        "metric_value": metric[1] if metric else None,
        "metrics": dict(lineage.metrics),
        "parameters": manifest.parameters,
        "created_at": lineage.created_at,
    }


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


GATE_KINDS = {
    "min": "pooled metric >= threshold",
    "max-gap": "best - worst site gap <= threshold",
    "min-unseen": "unseen-site metric >= threshold",
}
"""The checks of ``unicon model gate`` (option name without ``--``) and what each requires."""


class GateUsageError(ValueError):
    """A gate's command line is wrong: a malformed threshold or a task the version lacks."""


def version_evaluation(reg: Registry, version: str) -> dict[str, dict[str, float]]:
    """What a version's test evaluation recorded, per ``task@modality`` route.

    Parameters
    ----------
    reg
        The registry.
    version
        The version id.

    Returns
    -------
    dict
        ``pooled`` (the lineage's route metrics), ``gap`` (best - worst site) and ``unseen``
        (the held-out sites' metric): from the lineage's ``gap/<route>`` and
        ``unseen/<route>`` metrics, else from the run's ``results.json`` row of the
        version's stage (``fairness``, ``unseen``), else absent.

    Raises
    ------
    CoordinatorError, UniconModelError
        If the version or its run's ``results.json`` cannot be read.
    """
    lineage = reg.manifest(version).lineage
    metrics = lineage.metrics
    pooled = {k: float(v) for k, v in metrics.items() if "@" in k and "/" not in k}
    found: dict[str, dict[str, float]] = {"pooled": pooled, "gap": {}, "unseen": {}}
    for key in ("gap", "unseen"):
        prefix = f"{key}/"
        found[key] = {
            k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)
        }
    if (found["gap"] and found["unseen"]) or not lineage.plan:
        return found
    results = reg.results(lineage.plan)
    stages = results.get("stages", [])
    if lineage.stage not in stages:
        return found
    index = stages.index(lineage.stage)

    def row(key: str) -> dict[str, Any]:
        rows = results.get(key)
        entry = rows[index] if isinstance(rows, list) and index < len(rows) else {}
        return entry if isinstance(entry, dict) else {}

    if not found["gap"]:
        for route, entry in row("fairness").items():
            gap = entry.get("gap") if isinstance(entry, dict) else None
            if isinstance(gap, int | float) and not isinstance(gap, bool):
                found["gap"][route] = float(gap)
    if not found["unseen"]:
        for route, value in row("unseen").items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                found["unseen"][route] = float(value)
    return found


def parse_thresholds(option: str, values: list[str]) -> tuple[list[tuple[str, float]], list[str]]:
    """``task=value`` pairs of one gate option, and a problem per malformed one."""
    parsed: list[tuple[str, float]] = []
    problems: list[str] = []
    for text in values:
        task, sep, number = text.partition("=")
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not sep or not task.strip() or not math.isfinite(value):
            problems.append(
                f"--{option} {text!r}: give TASK=VALUE or TASK@MODALITY=VALUE with a finite "
                "number, e.g. lesion-class=0.7"
            )
            continue
        parsed.append((task.strip(), value))
    return parsed, problems


def _routes(task: str, routes: Collection[str]) -> list[str]:
    """The routes a gate's ``task`` names: itself if it is a route, else every ``task@*``."""
    if "@" in task:
        return [task] if task in routes else []
    return sorted(r for r in routes if r.split("@", 1)[0] == task)


def gate_checks(
    version: str,
    evaluation: Mapping[str, Mapping[str, float]],
    thresholds: Mapping[str, list[tuple[str, float]]],
) -> list[dict[str, Any]]:
    """Every check of a gate, passed or not, with the reason of each failure.

    Parameters
    ----------
    version
        The version id (named in the messages).
    evaluation
        :func:`version_evaluation` of the version.
    thresholds
        Gate kind (:data:`GATE_KINDS`) -> ``(task, value)`` pairs.

    Returns
    -------
    list of dict
        ``check``, ``task`` (as given), ``route``, ``threshold``, ``value`` (or None),
        ``passed`` and ``reason`` (empty when passed). A value that was not recorded fails.

    Raises
    ------
    GateUsageError
        Naming every task the version does not have, with the tasks and routes it has.
    """
    routes = set(evaluation["pooled"]) | set(evaluation["gap"]) | set(evaluation["unseen"])
    unknown = sorted(
        {task for pairs in thresholds.values() for task, _ in pairs if not _routes(task, routes)}
    )
    if unknown:
        tasks = sorted({r.split("@", 1)[0] for r in routes})
        raise GateUsageError(
            f"version {version} has no task {', '.join(map(repr, unknown))}; its tasks: "
            f"{', '.join(tasks) or 'none recorded'} (routes: {', '.join(sorted(routes)) or '-'})"
        )
    checks: list[dict[str, Any]] = []
    source = {"min": "pooled", "max-gap": "gap", "min-unseen": "unseen"}
    for kind, pairs in thresholds.items():
        for task, threshold in pairs:
            for route in _routes(task, routes):
                value = evaluation[source[kind]].get(route)
                reason = ""
                if value is None or not math.isfinite(value):
                    what = {
                        "min": "no pooled test metric",
                        "max-gap": "no per-site fairness (gap) recorded",
                        "min-unseen": "no unseen-site metric (no held-out site evaluated it; "
                        "see [evaluation] holdout_sites)",
                    }[kind]
                    reason = f"{route}: {what}"
                    value = None
                elif kind == "max-gap" and value > threshold:
                    reason = f"{route}: best - worst site gap {value:.3f} > {threshold:g}"
                elif kind == "min" and value < threshold:
                    reason = f"{route}: pooled test metric {value:.3f} < {threshold:g}"
                elif kind == "min-unseen" and value < threshold:
                    reason = f"{route}: unseen-site metric {value:.3f} < {threshold:g}"
                checks.append(
                    {
                        "check": kind,
                        "task": task,
                        "route": route,
                        "threshold": threshold,
                        "value": value,
                        "passed": not reason,
                        "reason": reason,
                    }
                )
    return checks


@app.command("gate")
def gate(
    version: Annotated[str, typer.Argument(help="Version id, e.g. v0004-pet.")],
    minimum: Annotated[
        list[str] | None,
        typer.Option(
            "--min",
            metavar="TASK=VALUE",
            help="Pooled test metric of every route of TASK (or of TASK@MODALITY) >= VALUE.",
        ),
    ] = None,
    max_gap: Annotated[
        list[str] | None,
        typer.Option("--max-gap", metavar="TASK=VALUE", help="Best - worst site gap <= VALUE."),
    ] = None,
    min_unseen: Annotated[
        list[str] | None,
        typer.Option(
            "--min-unseen",
            metavar="TASK=VALUE",
            help="Metric on the held-out (unseen) site(s) >= VALUE.",
        ),
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
    thresholds: dict[str, list[tuple[str, float]]] = {}
    problems: list[str] = []
    for kind, values in (("min", minimum), ("max-gap", max_gap), ("min-unseen", min_unseen)):
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
    reg = _open(registry)
    try:
        evaluation = version_evaluation(reg, version)
    except REGISTRY_ERRORS as e:
        raise _fail(e) from e
    try:
        checks = gate_checks(version, evaluation, thresholds)
    except GateUsageError as e:
        _error(e)
        raise typer.Exit(code=EXIT_USAGE) from e
    failures = [c["reason"] for c in checks if not c["passed"]]
    if as_json:
        emit_json(
            {"version": version, "passed": not failures, "checks": checks, "failures": failures}
        )
    else:
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
    for reason in failures:
        _error(reason)
    if failures:
        raise typer.Exit(code=EXIT_PROBLEMS)
