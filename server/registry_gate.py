"""The checks of ``unicon model gate``: thresholds against what a version's evaluation recorded.

:func:`version_evaluation` gathers a version's pooled, per-site gap and unseen-site metrics,
:func:`parse_thresholds` reads the ``TASK=VALUE`` options and :func:`gate_checks` compares
them; the command itself is in :mod:`server.registry_cli`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.registry import Registry


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


_SOURCE = {"min": "pooled", "max-gap": "gap", "min-unseen": "unseen"}
"""Gate kind -> the part of :func:`version_evaluation` it reads."""

_NOT_RECORDED = {
    "min": "no pooled test metric",
    "max-gap": "no per-site fairness (gap) recorded",
    "min-unseen": "no unseen-site metric (no held-out site evaluated it; "
    "see [evaluation] holdout_sites)",
}
"""Gate kind -> the reason of a failure when the version has no value to compare."""


def _refuse_unknown_tasks(
    version: str, thresholds: Mapping[str, list[tuple[str, float]]], routes: Collection[str]
) -> None:
    """Raise :class:`GateUsageError` naming every threshold task the version lacks."""
    unknown = sorted(
        {task for pairs in thresholds.values() for task, _ in pairs if not _routes(task, routes)}
    )
    if unknown:
        tasks = sorted({r.split("@", 1)[0] for r in routes})
        raise GateUsageError(
            f"version {version} has no task {', '.join(map(repr, unknown))}; its tasks: "
            f"{', '.join(tasks) or 'none recorded'} (routes: {', '.join(sorted(routes)) or '-'})"
        )


def _check(
    kind: str, task: str, route: str, threshold: float, value: float | None
) -> dict[str, Any]:
    """One check of a gate: ``value`` of ``route`` against ``threshold``, with the reason."""
    reason = ""
    if value is None or not math.isfinite(value):
        reason = f"{route}: {_NOT_RECORDED[kind]}"
        value = None
    elif kind == "max-gap" and value > threshold:
        reason = f"{route}: best - worst site gap {value:.3f} > {threshold:g}"
    elif kind == "min" and value < threshold:
        reason = f"{route}: pooled test metric {value:.3f} < {threshold:g}"
    elif kind == "min-unseen" and value < threshold:
        reason = f"{route}: unseen-site metric {value:.3f} < {threshold:g}"
    return {
        "check": kind,
        "task": task,
        "route": route,
        "threshold": threshold,
        "value": value,
        "passed": not reason,
        "reason": reason,
    }


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
    _refuse_unknown_tasks(version, thresholds, routes)
    checks: list[dict[str, Any]] = []
    for kind, pairs in thresholds.items():
        for task, threshold in pairs:
            for route in _routes(task, routes):
                value = evaluation[_SOURCE[kind]].get(route)
                checks.append(_check(kind, task, route, threshold, value))
    return checks
