"""Running a baseline's plan in process and assembling its results like the coordinator's.

:func:`federate` runs a plan over site folders (seeded like ``unicon simulate``'s
in-process engine); :func:`assembled_results` is the dict, shaped like a registry's
``results.json``, of a baseline whose R is put together from several runs (``local``,
``single-task``), which :func:`simulations.report.method_result` reads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.registry import Registry
from simulations.inprocess_run import run_in_process
from simulations.report import MethodResult, method_result
from unicon_model.metrics.uncertainty import CI_METHOD
from unicon_model.schema import validate_plan

logger = logging.getLogger(__name__)


def federate(raw: dict[str, Any], site_dirs: Sequence[Path], work: Path) -> Registry:
    """Run the plan ``raw`` over ``site_dirs`` in process; its registry is ``work/registry``.

    NumPy's global state is seeded with the plan's model seed for the run
    (:func:`simulations.inprocess_run.run_in_process`).
    """
    plan = validate_plan(raw)
    registry = Registry(work / "registry")
    run_in_process(plan, registry, site_dirs, work / "state", seed=plan.model.seed)
    return registry


def round_records(registry: Registry, plan_name: str) -> list[dict[str, Any]]:
    """The plan's round records (``kind == "round"``) in the registry's metrics."""
    return [r for r in registry.metrics(plan_name) if r.get("kind") == "round"]


def registry_result(name: str, registry: Registry, plan_name: str, wall_s: float) -> MethodResult:
    """The method's results from the registry of its run."""
    return method_result(
        name, registry.results(plan_name), round_records(registry, plan_name), wall_s
    )


def assembled_results(
    stages: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    per_site: Mapping[str, Mapping[str, Any]],
    rows_ci: Sequence[Mapping[str, Any]],
    per_site_ci: Mapping[str, Mapping[str, Any]],
    *,
    bytes_up: Mapping[str, int],
    bytes_down: Mapping[str, int],
    epsilon: Mapping[str, float],
) -> dict[str, Any]:
    """A results dict like a registry's for a method assembled from several runs.

    Parameters
    ----------
    stages
        The plan's stage names.
    rows, rows_ci
        One row per stage: ``task@modality`` -> the pooled value (``R``) or its interval.
    per_site, per_site_ci
        Site -> stage -> row (``R_per_site``, ``R_per_site_ci``).
    bytes_up, bytes_down, epsilon
        Per site.

    Returns
    -------
    dict
        ``stages``, ``R``, ``R_per_site``, ``R_ci``, ``R_per_site_ci``, ``R_ci_method``
        (:data:`~unicon_model.metrics.uncertainty.CI_METHOD`), ``bytes_up``, ``bytes_down``
        and ``epsilon``; no fairness or calibration rows (:func:`method_result` derives the
        fairness figures from ``R_per_site``).
    """
    return {
        "stages": stages,
        "R": rows,
        "R_per_site": per_site,
        "R_ci": rows_ci,
        "R_per_site_ci": per_site_ci,
        "R_ci_method": CI_METHOD,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "epsilon": epsilon,
    }
