"""``unicon status`` as tables: one line per stage, or one stage in full.

The documents come from :mod:`server.run_status`; each function prints on the console it is
given (the command line's, so its width follows the terminal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console

from server.run_status import plan_status
from unicon_model.cli_output import Cell, Column, fitted_table

if TYPE_CHECKING:
    from server.registry import Registry


def number(value: object, spec: str) -> str:
    """``value`` formatted with ``spec`` if it is a number, else ``-``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return "-"


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


def print_status(registry: Registry, plan: str, console: Console) -> None:
    """One line per stage of ``plan``: state, version, sites, round, loss, metric, worst site."""
    summary = plan_status(registry, plan)
    rows: list[list[Cell]] = [
        [
            row["stage"],
            row["state"],
            row["version"] or "-",
            str(row["site_count"]) if row["sites"] else "-",
            _round_text(row),
            number(row["loss"], ".4g"),
            "-" if row["metric"] is None else f"{row['metric']} {row['metric_value']:.3f}",
            "-" if row["worst_site"] is None else f"{row['worst_site']} {row['worst']:.3f}",
        ]
        for row in summary["stages"]
    ]
    console.print(fitted_table(f"plan {plan}", STATUS_COLUMNS, rows, console.width))


def print_stage(detail: dict[str, Any], console: Console) -> None:
    """Every table of one stage (``status --stage NAME``) from :func:`stage_status`."""
    width = console.width
    _print_facts(detail, console, width)
    _print_rounds(detail, console, width)
    _print_values(detail, console, width)
    if detail["fairness"]:
        _print_fairness(detail, console, width)
    if detail["epsilon"]:
        _print_epsilon(detail, console, width)


def _print_facts(detail: dict[str, Any], console: Console, width: int) -> None:
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


def _print_rounds(detail: dict[str, Any], console: Console, width: int) -> None:
    rounds = [
        [
            number(r["round"], ".0f"),
            str(len(r["sites"])),
            number(r["loss"], ".4g"),
            number(r["val_score"], ".3f"),
            number(r["wall_s"], ".1f"),
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


def _print_values(detail: dict[str, Any], console: Console, width: int) -> None:
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


def _print_fairness(detail: dict[str, Any], console: Console, width: int) -> None:
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
                [route, e["worst_site"], f"{e['worst']:.3f}", number(e["gap"], ".3f")]
                for route, e in sorted(detail["fairness"].items())
            ],
            width,
        )
    )


def _print_epsilon(detail: dict[str, Any], console: Console, width: int) -> None:
    console.print(
        fitted_table(
            "privacy spent (ε per site)",
            (Column("site"), Column("ε", justify="right")),
            [[s, f"{e:.3g}"] for s, e in sorted(detail["epsilon"].items())],
            width,
        )
    )
