"""Output of one ``python -m simulations.bench --only NAME`` run: its results file and row."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

__all__ = ["print_figure_row", "progress", "write_only_results"]


def write_only_results(out: Path, key: str, entry: Mapping[str, Any]) -> None:
    """Write ``out/results.json`` as ``{key: entry}`` (``make bench`` nests the same entry)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({key: entry}, indent=2))


def print_figure_row(title: str, row: Sequence[str]) -> None:
    """Print one ``benchmark | figure`` row as a table on the benchmark's console."""
    from simulations import bench  # at call time: bench imports the modules that call this

    table = Table(title=title)
    table.add_column("benchmark")
    table.add_column("figure")
    table.add_row(*row)
    bench.console.print(table)


def progress(text: str) -> None:
    """A progress line on the benchmark's console (:data:`simulations.bench.console`, looked
    up at every call so a test can swap it)."""
    from simulations import bench  # at call time: bench imports the modules that call this

    bench.console.print(text)
