"""The outcome of a site manifest check: its problems and the rich summary tables.

:class:`Problem` is one error or warning found by :func:`client.manifest_check.check_manifest`;
:class:`ManifestReport` holds them all, with the manifest and its counts, and renders the
problems and a per-task and per-modality summary with rich.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.manifest import SPLITS, SiteManifest

__all__ = ["ManifestReport", "Problem", "Severity"]

Severity = Literal["error", "warning"]
"""How bad a :class:`Problem` is: ``error`` (the site cannot join as is) or ``warning``."""


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`client.manifest_check.check_manifest`.

    Attributes
    ----------
    severity
        ``error`` (the site cannot join as is) or ``warning``.
    case
        The case id (or ``cases[i]`` for a case without a valid id); ``None`` for problems
        of the whole manifest.
    field
        Dotted field path, e.g. ``images.ct``, ``labels.lesion-seg``, ``tasks.survival``.
    message
        What is wrong and how to fix it.
    """

    severity: Severity
    case: str | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"case {self.case!r} " if self.case is not None else ""
        return f"{self.severity}: {where}{self.field}: {self.message}"


@dataclass
class ManifestReport:
    """The outcome of :func:`client.manifest_check.check_manifest`.

    Attributes
    ----------
    problems
        Every problem found, errors and warnings.
    manifest
        The loaded manifest; ``None`` when it is structurally invalid.
    counts
        ``manifest.counts()``, or ``{}`` without a manifest.
    source
        The manifest file checked.
    """

    problems: list[Problem] = field(default_factory=list)
    manifest: SiteManifest | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def ok(self) -> bool:
        """Whether there is no error (warnings are allowed)."""
        return not self.errors

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity ``error``."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """The problems of severity ``warning``."""
        return [p for p in self.problems if p.severity == "warning"]

    def render(self, console: Console) -> None:
        """Print the problems table (if any) and the per-task and per-modality summaries.

        Parameters
        ----------
        console
            Where to print.
        """
        if self.problems:
            console.print(self._problems_table())
        if self.manifest is not None:
            console.print(self._tasks_table(self.manifest))
            console.print(self._modalities_table())

    def _problems_table(self) -> Table:
        errors, warnings = len(self.errors), len(self.warnings)
        where = f" in {self.source}" if self.source else ""
        table = Table(title=f"{errors} error(s), {warnings} warning(s){where}")
        table.add_column("severity", no_wrap=True)
        table.add_column("case", no_wrap=True)
        table.add_column("field", no_wrap=True)
        table.add_column("message", overflow="fold")
        for problem in self.problems:
            style = "red" if problem.severity == "error" else "yellow"
            table.add_row(
                Text(problem.severity, style=style),
                Text(problem.case or "-"),
                Text(problem.field or "-"),
                Text(problem.message),
            )
        return table

    def _tasks_table(self, manifest: SiteManifest) -> Table:
        table = Table(title=f"site {manifest.site}: {len(manifest.cases)} case(s); labels per task")
        for column in ("task", "kind", *SPLITS, "class balance (train)"):
            # a long class list wraps between words; a name is never cut with an ellipsis
            table.add_column(
                column, justify="right" if column in SPLITS else "left", overflow="fold"
            )
        tasks = self.counts.get("tasks", {})
        classes = self.counts.get("classes", {})
        for name, declaration in manifest.tasks.items():
            split_counts = tasks.get(name, {})
            balance = " / ".join(f"{c} {n}" for c, n in classes.get(name, {}).items()) or "-"
            table.add_row(
                Text(name),
                declaration.kind,
                *(str(split_counts.get(split, 0)) for split in SPLITS),
                Text(balance),
            )
        unlabelled = self.counts.get("unlabelled", {})
        if any(unlabelled.values()):
            table.add_row(
                Text("(no label)"),
                "self-supervised only",
                *(str(unlabelled.get(split, 0)) for split in SPLITS),
                "-",
            )
        return table

    def _modalities_table(self) -> Table:
        table = Table(title="cases per modality")
        table.add_column("modality", overflow="fold")
        for split in SPLITS:
            table.add_column(split, justify="right")
        for name, split_counts in self.counts.get("modalities", {}).items():
            table.add_row(Text(name), *(str(split_counts.get(split, 0)) for split in SPLITS))
        return table
