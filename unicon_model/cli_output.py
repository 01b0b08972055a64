"""What every ``unicon`` command shares about its output: exit codes, JSON, narrow tables.

- Exit codes are the same for every command: :data:`EXIT_OK` (0), :data:`EXIT_PROBLEMS`
  (1: the command ran and found problems, or could not read what it was asked about) and
  :data:`EXIT_USAGE` (2: the command line itself is wrong; typer's own usage errors are 2).
- ``--json`` prints exactly one JSON document on stdout (:func:`emit_json`); messages,
  warnings and progress go to stderr (:data:`stderr`), so ``unicon status --json | jq``
  always parses.
- :func:`fitted_table` builds a rich table that fits the terminal: optional columns are
  dropped, least important first, until the rest fits, and a cell that is still too wide
  wraps between words instead of being cut with ``…``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

Cell = str | Text
"""A table cell: plain text (never read as markup) or styled :class:`~rich.text.Text`."""

EXIT_OK = 0
"""Exit code: done, nothing wrong."""
EXIT_PROBLEMS = 1
"""Exit code: problems found (invalid file, broken chain, damaged registry, not found)."""
EXIT_USAGE = 2
"""Exit code: the command line is wrong (missing or contradicting options)."""

stderr = Console(stderr=True)
"""Where messages, warnings and progress go (never mixed into a ``--json`` document)."""


def emit_json(data: Any) -> None:
    """Print ``data`` as one JSON document on stdout (non-finite numbers become ``null``).

    Parameters
    ----------
    data
        JSON-serialisable data (dicts, lists, strings, numbers, ``None``).
    """
    typer.echo(json.dumps(_finite(data), indent=2, ensure_ascii=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def error(message: object, *, style: str = "red") -> None:
    """Print a message on stderr verbatim (no markup, no wrapping, so paths stay whole)."""
    stderr.print(str(message), markup=False, style=style, soft_wrap=True, highlight=False)


@dataclass(frozen=True)
class Column:
    """A column of a :func:`fitted_table`.

    Attributes
    ----------
    name
        Header.
    drop
        ``None`` for a column that is always shown; otherwise its rank among the optional
        columns: the highest rank is dropped first when the table is too wide.
    justify
        Alignment of the cells.
    """

    name: str
    drop: int | None = None
    justify: Literal["left", "right"] = "left"


def _build(columns: Sequence[Column], rows: Sequence[Sequence[Cell]], show_header: bool) -> Table:
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        show_header=show_header,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    for column in columns:
        # fold only breaks a single word longer than the whole terminal; never an ellipsis
        table.add_column(column.name, justify=column.justify, overflow="fold")
    for row in rows:
        table.add_row(*(Text(c) if isinstance(c, str) else c for c in row))
    return table


def table_width(table: Table, *, wrapped: bool = False) -> int:
    """Columns the table needs: every cell on one line, or (``wrapped``) its longest word."""
    probe = Console(file=io.StringIO(), width=100_000)
    measured = probe.measure(table)
    return measured.minimum if wrapped else measured.maximum


def fitted_table(
    title: str | None,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Cell]],
    width: int,
    *,
    show_header: bool = True,
    wrap: bool = False,
) -> RenderableType:
    """A titled table of ``rows`` that fits ``width`` columns, dropping optional columns.

    Parameters
    ----------
    title
        A line above the table (wraps between words, never cut), or ``None``.
    columns
        The columns, in display order.
    rows
        One sequence of cells per row, in the order of ``columns``.
    width
        The terminal's width (``console.width``).
    show_header
        Print the column names (``False`` for a two-column list of facts).
    wrap
        Cells may wrap between words: a column is dropped only when the longest word of
        every kept column no longer fits (default: when a row no longer fits on one line).

    Returns
    -------
    RenderableType
        The title and the widest table that fits: optional columns are dropped in
        decreasing ``drop`` rank until every remaining cell fits on its line; if even the
        required columns do not fit, cells wrap between words (a name is never cut with
        ``…``).
    """
    keep = list(range(len(columns)))
    optional = sorted(
        (i for i, c in enumerate(columns) if c.drop is not None),
        key=lambda i: -(columns[i].drop or 0),
    )
    while True:
        table = _build(
            [columns[i] for i in keep], [[row[i] for i in keep] for row in rows], show_header
        )
        if table_width(table, wrapped=wrap) <= width or not optional:
            break
        keep.remove(optional.pop(0))
    if title is None:
        return table
    return Group(Text(title, style="bold"), table)
