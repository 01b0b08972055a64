"""Checking a site manifest and every file it names, reporting all problems at once.

:func:`check_manifest` is what ``unicon site check`` runs before a hospital joins a
federation. It validates the manifest (:func:`client.manifest.parse_manifest`), then opens
every image and mask of every case whose entry is valid with
:func:`client.images.read_image` (refusing files whose header declares more voxels than a
limit before reading their data) and reports, in one run:

- errors: the manifest's field errors (unknown fields, unknown splits, duplicate case ids,
  invalid site name, labels of undeclared tasks, ...), missing, corrupt or oversized files,
  image keys the plan does not know, NaN/Inf voxels, images of one case on different grids,
  masks whose grid differs from the case's first image, mask values that are not integers
  in ``0..len(labels) - 1``, a declared task without any train case, a site without cases
  (these last two only when every case entry is valid, since counts over the valid cases
  alone would report false gaps);
- warnings: a task without val or test cases, a class without train cases.

:class:`~client.manifest_report.ManifestReport` (defined in :mod:`client.manifest_report`,
importable from here too) renders the problems and a per-task and per-modality summary with
rich.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from client.errors import DataError
from client.images import MAX_IMAGE_VOXELS, read_image
from client.manifest import Case, SiteManifest, parse_manifest
from client.manifest_report import ManifestReport, Problem

logger = logging.getLogger(__name__)

__all__ = ["ManifestReport", "Problem", "check_manifest"]

_MAX_SHOWN_VALUES = 8
"""Offending mask values listed in a message before it is cut short."""


@dataclass(frozen=True)
class _FileSummary:
    """What the checks need to know about one file (arrays are not kept)."""

    problem: str | None = None
    channels: int = 0
    shape: tuple[int, ...] = ()
    non_finite: int = 0
    mask_values: tuple[float, ...] = ()


class _Progress:
    """A rich progress bar over the files, or nothing."""

    def __init__(self, total: int, enabled: bool, console: Console | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.console = console
        self._bar: Progress | None = None
        self._task: Any = None

    @contextmanager
    def running(self) -> Iterator[_Progress]:
        if not self.enabled:
            yield self
            return
        self._bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console or Console(stderr=True),
            transient=True,
        )
        with self._bar:
            self._task = self._bar.add_task("reading files", total=self.total)
            yield self
        self._bar = None

    def advance(self, name: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"reading {name}")


class _Checker:
    """Reads every file of a manifest once and collects the problems."""

    def __init__(
        self, manifest: SiteManifest, progress: _Progress, max_voxels: int = MAX_IMAGE_VOXELS
    ) -> None:
        self.manifest = manifest
        self.progress = progress
        self.max_voxels = max_voxels
        self.problems: list[Problem] = []
        self._summaries: dict[tuple[Path, bool], _FileSummary] = {}

    def error(self, case: str | None, field_name: str, message: str) -> None:
        self.problems.append(Problem("error", case, field_name, message))

    def warning(self, case: str | None, field_name: str, message: str) -> None:
        self.problems.append(Problem("warning", case, field_name, message))

    def summary(self, relative: str, *, mask: bool) -> _FileSummary:
        path = self.manifest.resolve(relative)
        key = (path, mask)
        if key not in self._summaries:
            self._summaries[key] = _summarise(path, mask=mask, max_voxels=self.max_voxels)
            self.progress.advance(Path(relative).name)
        return self._summaries[key]

    def check_case(self, case: Case) -> None:
        shapes: dict[str, tuple[int, ...]] = {}
        for key, relative in case.images.items():
            summary = self.summary(relative, mask=False)
            where = f"images.{key}"
            if summary.problem is not None:
                self.error(case.id, where, summary.problem)
                continue
            if summary.non_finite:
                self.error(
                    case.id,
                    where,
                    f"{self.manifest.resolve(relative)} has {summary.non_finite} NaN or "
                    "infinite voxel(s); replace them with finite values",
                )
            shapes[key] = summary.shape
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{k} {_shape(s)}" for k, s in shapes.items())
            self.error(
                case.id,
                "images",
                f"the images have different grids ({listed}); resample them to one grid",
            )
        first = next(iter(case.images))
        reference = shapes.get(first)
        for task, label in case.labels.items():
            declaration = self.manifest.tasks.get(task)
            if declaration is None or declaration.kind != "segmentation":
                continue
            self._check_mask(case, task, str(label), len(declaration.labels), first, reference)

    def _check_mask(
        self,
        case: Case,
        task: str,
        relative: str,
        n_labels: int,
        first: str,
        reference: tuple[int, ...] | None,
    ) -> None:
        where = f"labels.{task}"
        summary = self.summary(relative, mask=True)
        path = self.manifest.resolve(relative)
        if summary.problem is not None:
            self.error(case.id, where, summary.problem)
            return
        if summary.channels != 1:
            self.error(case.id, where, f"{path} has {summary.channels} channels; a mask needs one")
        if reference is not None and summary.shape != reference:
            self.error(
                case.id,
                where,
                f"the mask grid {_shape(summary.shape)} differs from the grid "
                f"{_shape(reference)} of the case's first image {first!r}; resample the mask "
                "to the image grid",
            )
        if summary.non_finite:
            self.error(case.id, where, f"{path} has {summary.non_finite} NaN or infinite voxel(s)")
        bad = [v for v in summary.mask_values if v != round(v) or not 0 <= v <= n_labels - 1]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:_MAX_SHOWN_VALUES])
            more = (
                f" and {len(bad) - _MAX_SHOWN_VALUES} more" if len(bad) > _MAX_SHOWN_VALUES else ""
            )
            self.error(
                case.id,
                where,
                f"mask values must be integers in 0..{n_labels - 1} (one per declared label); "
                f"{path} has {shown}{more}",
            )

    def check_modalities(self, known: Sequence[str]) -> None:
        for case in self.manifest.cases:
            for key in case.images:
                if key not in known:
                    self.error(
                        case.id,
                        f"images.{key}",
                        f"image key {key!r} is not a modality input the plan knows "
                        f"({sorted(known)}); rename it or leave it out",
                    )

    def check_splits(self, counts: dict[str, Any]) -> None:
        if not self.manifest.cases:
            self.error(None, "cases", "the manifest has no cases; list the site's cases")
        for name, declaration in self.manifest.tasks.items():
            split_counts = counts["tasks"][name]
            if split_counts["train"] == 0:
                self.error(
                    None,
                    f"tasks.{name}",
                    f"no train case has a label for task {name!r}; label train cases or "
                    "remove the task",
                )
            for split in ("val", "test"):
                if split_counts[split] == 0:
                    self.warning(
                        None,
                        f"tasks.{name}",
                        f"no {split} case has a label for task {name!r}; the site cannot "
                        f"report {'validation' if split == 'val' else 'test'} metrics for it",
                    )
            if declaration.kind == "classification":
                for label, n in counts["classes"].get(name, {}).items():
                    if n == 0:
                        self.warning(
                            None,
                            f"tasks.{name}.classes",
                            f"class {label!r} has no train case; the model cannot learn it "
                            "at this site",
                        )


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _summarise(path: Path, *, mask: bool, max_voxels: int) -> _FileSummary:
    if not path.exists():
        return _FileSummary(problem=f"file {path} does not exist")
    try:
        array, _ = read_image(path, max_voxels=max_voxels)
    except DataError as e:
        return _FileSummary(problem=f"cannot read the file: {e}")
    except MemoryError:
        return _FileSummary(problem=f"{path} is too large to read into memory")
    finite = np.isfinite(array)
    non_finite = int(array.size - np.count_nonzero(finite))
    values: tuple[float, ...] = ()
    if mask:
        values = _distinct_values(array[finite])
    return _FileSummary(
        channels=int(array.shape[0]),
        shape=tuple(int(s) for s in array.shape[1:]),
        non_finite=non_finite,
        mask_values=values,
    )


def _distinct_values(values: np.ndarray) -> tuple[float, ...]:
    """Sorted distinct values; linear time for the usual small integer labels."""
    integral = values == np.rint(values)
    fractional = np.unique(values[~integral]) if not integral.all() else np.empty(0)
    integers = values[integral].astype(np.int64)
    if integers.size == 0:
        distinct: np.ndarray = np.empty(0)
    elif int(integers.max()) - int(integers.min()) <= 1 << 20:
        low = int(integers.min())
        distinct = np.flatnonzero(np.bincount(integers - low)) + low
    else:
        distinct = np.unique(integers)
    return tuple(sorted(float(v) for v in (*distinct, *fractional)))


def _file_count(manifest: SiteManifest) -> int:
    paths: set[tuple[Path, bool]] = set()
    for case in manifest.cases:
        paths.update((manifest.resolve(p), False) for p in case.images.values())
        for task, label in case.labels.items():
            declaration = manifest.tasks.get(task)
            if declaration is not None and declaration.kind == "segmentation":
                paths.add((manifest.resolve(str(label)), True))
    return len(paths)


def _check_cases(
    parsed: SiteManifest,
    known_modalities: Sequence[str] | None,
    bar: _Progress,
    max_voxels: int,
) -> _Checker:
    """A checker that has checked the image keys (if known) and every case's files."""
    checker = _Checker(parsed, bar, max_voxels)
    if known_modalities is not None:
        checker.check_modalities(known_modalities)
    with bar.running():
        for case in parsed.cases:
            checker.check_case(case)
    return checker


def _log_checked(path: str | Path, valid_cases: int, report: ManifestReport) -> None:
    logger.info(
        "checked manifest %s: %d valid case(s), %d error(s), %d warning(s)",
        path,
        valid_cases,
        len(report.errors),
        len(report.warnings),
    )


def check_manifest(
    path: str | Path,
    known_modalities: Sequence[str] | None = None,
    *,
    progress: bool = False,
    max_voxels: int = MAX_IMAGE_VOXELS,
    progress_console: Console | None = None,
) -> ManifestReport:
    """Validate a site manifest and every file it names; collect every problem.

    The manifest's field errors and the problems of the files of every case whose entry is
    valid are reported together; a case with field errors is reported by those alone (its
    files are checked once the entry is fixed).

    Parameters
    ----------
    path
        The manifest file (YAML, JSON or a MONAI/Decathlon datalist).
    known_modalities
        Image keys the federation's plan knows; other keys are errors. ``None`` skips this
        check.
    progress
        Show a rich progress bar while reading the files (on stderr unless
        ``progress_console`` is given; nothing is drawn when that is not a terminal).
    max_voxels
        Largest number of voxels (all channels) an image may declare; a larger file is
        reported without reading its data.
    progress_console
        Where the progress bar is drawn (default: a console on stderr).

    Returns
    -------
    ManifestReport
        Every problem (errors and warnings), the manifest (``None`` if structurally invalid)
        and its counts.
    """
    result = parse_manifest(path)
    structural = [
        Problem("error", p.case if p.case is not None else _index(p.index), p.field, p.message)
        for p in result.problems
    ]
    parsed = result.parsed
    if parsed is None:
        logger.info("manifest %s cannot be read: %d problem(s)", path, len(structural))
        return ManifestReport(problems=structural, source=str(path))
    counts = parsed.counts()
    bar = _Progress(_file_count(parsed), progress, progress_console)
    checker = _check_cases(parsed, known_modalities, bar, max_voxels)
    if result.complete:  # with cases left out, per-task counts would report false gaps
        checker.check_splits(counts)
    manifest = result.manifest
    report = ManifestReport(
        problems=structural + checker.problems,
        manifest=manifest,
        counts=counts if manifest is not None else {},
        source=str(path),
    )
    _log_checked(path, len(parsed.cases), report)
    return report


def _index(index: int | None) -> str | None:
    return None if index is None else f"cases[{index}]"
