"""A method's results over a plan's stages (:class:`MethodResult`), assembled from a registry.

:func:`method_result` reads a registry's ``results.json`` (or a baseline's dict of the same
shape) and the round records into the stages x ``task@modality`` matrix ``R``, its
intervals, per-site values, fairness, calibration, the continual-learning metrics (ACC, BWT,
forgetting), the box-prompted Dice of prompted segmentation routes and, with held-out sites,
the unseen hospital's values. The format of the
``results.json`` that :func:`simulations.report.write_report` writes is described in
:mod:`simulations.report`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unicon_model.metrics.continual import summarise
from unicon_model.metrics.fairness import site_spread

logger = logging.getLogger(__name__)

AGGREGATION = (
    "case-weighted mean of site metrics: each site computes the metric over its own cases and "
    "the values are averaged weighted by the sites' case counts; not a metric over the pooled "
    "cases, which would need per-case predictions and labels that the sites do not release"
)
"""What R and the validation scores are (``R_aggregation`` in ``results.json``)."""


@dataclass(frozen=True)
class MethodResult:
    """One method's results over a plan's stages."""

    name: str
    stages: list[str]
    tasks: list[str]
    R: list[list[float]]
    R_per_site: dict[str, list[list[float]]]
    acc: float
    bwt: float
    forgetting: float
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    epsilon: dict[str, float]
    wall_s: float
    rounds: list[dict[str, Any]]
    R_ci: list[list[list[float] | None]] = field(default_factory=list)
    R_per_site_ci: dict[str, list[list[list[float] | None]]] = field(default_factory=dict)
    fairness: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    ci_method: str = ""
    holdout_sites: list[str] = field(default_factory=list)
    unseen: list[list[float]] = field(default_factory=list)
    unseen_ci: list[list[list[float] | None]] = field(default_factory=list)
    unseen_per_site: dict[str, list[list[float]]] = field(default_factory=dict)
    dice_prompted: list[list[float]] = field(default_factory=list)
    """Stages x ``tasks``: the case-weighted Dice with each case's label box of the
    box-prompted segmentation routes (NaN elsewhere); empty when no route is prompted."""

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict (NaN as ``null``)."""

        def clean(value: Any) -> Any:
            if isinstance(value, float):
                return None if math.isnan(value) else value
            if isinstance(value, list):
                return [clean(v) for v in value]
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        unseen = (
            {
                "unseen": {
                    "sites": self.holdout_sites,
                    "R": self.unseen,
                    "R_ci": self.unseen_ci,
                    "R_per_site": self.unseen_per_site,
                }
            }
            if self.holdout_sites
            else {}
        )
        prompted = {"dice_prompted": self.dice_prompted} if self.dice_prompted else {}
        cleaned: dict[str, Any] = clean(  # clean() keeps a dict a dict
            {
                **unseen,
                "stages": self.stages,
                "tasks": self.tasks,
                "R": self.R,
                "R_per_site": self.R_per_site,
                "R_ci": self.R_ci,
                "R_per_site_ci": self.R_per_site_ci,
                "R_ci_method": self.ci_method,
                "fairness": self.fairness,
                "calibration": self.calibration,
                **prompted,
                "acc": self.acc,
                "bwt": self.bwt,
                "forgetting": self.forgetting,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
                "epsilon": self.epsilon,
                "wall_s": self.wall_s,
                "rounds": self.rounds,
                "kept_rounds": kept_rounds(self.rounds),
            }
        )
        return cleaned


def kept_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Stage -> the round whose model was committed: the best-validated round, else the last.

    Read from the round records (``best_round`` of the stage's last record, which is what
    the coordinator commits with ``keep_best``; without validation, the last round).
    """
    kept: dict[str, int] = {}
    for record in rounds:
        stage, round_ = record.get("stage"), record.get("round")
        if isinstance(stage, str) and isinstance(round_, int):
            best = record.get("best_round")
            keep = record.get("keep_best", True) is not False
            kept[stage] = best if keep and isinstance(best, int) else round_
    return kept


def results_matrix(
    stages: Sequence[str], rows: Sequence[Mapping[str, float]]
) -> tuple[list[str], np.ndarray]:
    """Columns in order of first appearance and the stages x columns matrix (NaN if absent)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    matrix = np.full((len(stages), len(columns)), np.nan)
    for i, row in enumerate(rows):
        for j, column in enumerate(columns):
            value = row.get(column)
            if value is not None and math.isfinite(value):
                matrix[i, j] = value
    return columns, matrix


def continual_metrics(matrix: np.ndarray) -> tuple[float, float, float]:
    """ACC, BWT and average forgetting, each task introduced where its column starts."""
    if matrix.size == 0:
        return math.nan, math.nan, math.nan
    introduced = []
    for j in range(matrix.shape[1]):
        finite = np.flatnonzero(np.isfinite(matrix[:, j]))
        introduced.append(int(finite[0]) if finite.size else matrix.shape[0])
    # a column that disappears later (site gone) is carried forward as missing: fill with the
    # last value so the metrics stay defined; such gaps are reported in the matrix as null
    filled = matrix.copy()
    for j, start in enumerate(introduced):
        for i in range(start + 1, matrix.shape[0]):
            if not np.isfinite(filled[i, j]):
                filled[i, j] = filled[i - 1, j]
    summary = summarise(filled, introduced)
    return summary.acc, summary.bwt, summary.forgetting


def method_result(
    name: str, registry_results: Mapping[str, Any], rounds: list[dict[str, Any]], wall_s: float
) -> MethodResult:
    """Assemble a method's results from a registry's ``results.json`` and round records."""
    stages = list(registry_results.get("stages", []))
    tasks, matrix = results_matrix(stages, registry_results.get("R", []))
    per_site: dict[str, list[list[float]]] = {}
    for site, by_stage in registry_results.get("R_per_site", {}).items():
        site_rows = [by_stage.get(stage, {}) for stage in stages]
        aligned = np.full((len(stages), len(tasks)), np.nan)
        site_columns, site_values = results_matrix(stages, site_rows)
        for j, column in enumerate(site_columns):
            aligned[:, tasks.index(column)] = site_values[:, j]
        per_site[site] = aligned.tolist()
    per_site_ci = {
        site: interval_matrix(tasks, [by_stage.get(stage, {}) for stage in stages])
        for site, by_stage in registry_results.get("R_per_site_ci", {}).items()
    }
    acc, bwt, forgetting = continual_metrics(matrix)
    holdout = [str(s) for s in registry_results.get("holdout_sites") or []]
    unseen_rows = _rows(registry_results.get("unseen"), len(stages)) if holdout else []
    unseen_per_site = {
        site: _aligned(tasks, [by_stage.get(stage, {}) for stage in stages])
        for site, by_stage in (registry_results.get("unseen_per_site") or {}).items()
        if holdout
    }
    return MethodResult(
        name=name,
        stages=stages,
        tasks=tasks,
        R=matrix.tolist(),
        R_per_site=per_site,
        acc=acc,
        bwt=bwt,
        forgetting=forgetting,
        bytes_up=dict(registry_results.get("bytes_up", {})),
        bytes_down=dict(registry_results.get("bytes_down", {})),
        epsilon=dict(registry_results.get("epsilon", {})),
        wall_s=wall_s,
        rounds=rounds,
        R_ci=interval_matrix(tasks, _rows(registry_results.get("R_ci"), len(stages))),
        R_per_site_ci=per_site_ci,
        fairness=_final_fairness(registry_results, stages, per_site),
        calibration=dict(_last(registry_results.get("calibration"), len(stages))),
        ci_method=str(registry_results.get("R_ci_method", "")),
        holdout_sites=holdout,
        unseen=_aligned(tasks, unseen_rows) if holdout else [],
        unseen_ci=interval_matrix(tasks, _rows(registry_results.get("unseen_ci"), len(stages)))
        if holdout
        else [],
        unseen_per_site=unseen_per_site,
        dice_prompted=_prompted(tasks, registry_results.get("dice_prompted"), len(stages)),
    )


def _prompted(tasks: Sequence[str], rows: Any, stages: int) -> list[list[float]]:
    """The ``dice_prompted`` matrix (stages x ``tasks``), empty when no route reported it."""
    matrix = _aligned(tasks, _rows(rows, stages))
    return matrix if any(math.isfinite(v) for row in matrix for v in row) else []


def _aligned(tasks: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Stages x ``tasks`` matrix of the rows' values (NaN where absent or not finite)."""
    out = []
    for row in rows:
        values = []
        for task in tasks:
            value = row.get(task) if isinstance(row, Mapping) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                values.append(float(value) if math.isfinite(value) else math.nan)
            else:
                values.append(math.nan)
        out.append(values)
    return out


def _rows(rows: Any, stages: int) -> list[Mapping[str, Any]]:
    """``rows`` (one dict per stage) padded or cut to ``stages`` entries."""
    kept: list[Mapping[str, Any]] = [r if isinstance(r, Mapping) else {} for r in (rows or [])]
    kept = kept[:stages]
    return kept + [{}] * (stages - len(kept))


def _last(rows: Any, stages: int) -> Mapping[str, Any]:
    """The row of the last stage in a per-stage list (empty if absent)."""
    padded = _rows(rows, stages)
    return padded[-1] if padded else {}


def _interval(value: Any) -> list[float] | None:
    """``[lo, hi]`` if ``value`` is a pair of finite numbers with ``lo <= hi``, else None."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    lo, hi = value
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    if not numbers or not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        return None
    return [float(lo), float(hi)]


def interval_matrix(
    tasks: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> list[list[list[float] | None]]:
    """Stages x ``tasks`` matrix of ``[lo, hi]`` intervals (None where absent or invalid)."""
    return [[_interval(row.get(task)) for task in tasks] for row in rows]


def _final_fairness(
    registry_results: Mapping[str, Any], stages: Sequence[str], per_site: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Fairness after the last stage: the coordinator's record, else from ``R_per_site``.

    A baseline assembled without the coordinator's fairness record (``local``,
    ``single-task``, ``unet``) gets the worst site, best site and gap from its per-site
    final metrics; without per-site case counts its weighted SD is NaN.
    """
    recorded = _last(registry_results.get("fairness"), len(stages))
    if recorded:
        return {c: dict(v) for c, v in recorded.items() if isinstance(v, Mapping)}
    if not stages:
        return {}
    tasks, _ = results_matrix(stages, registry_results.get("R", []))
    counts = registry_results.get("R_per_site_n", {})
    out: dict[str, dict[str, Any]] = {}
    for j, task in enumerate(tasks):
        values = {site: rows[-1][j] for site, rows in per_site.items() if rows}
        cases = {
            site: float(counts.get(site, {}).get(stages[-1], {}).get(task, 0.0) or 0.0)
            for site in values
        }
        spread = site_spread(values, cases)
        if spread is not None:
            out[task] = spread
    return out
