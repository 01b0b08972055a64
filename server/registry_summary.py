"""One registry version in a line: its own headline metric and its ``model ls --json`` entry.

Shared by ``unicon model ls`` (:mod:`server.registry_cli`) and ``unicon status``
(:mod:`server.cli`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unicon_model.checkpoint import CheckpointManifest, Lineage


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
