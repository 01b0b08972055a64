"""What ``unicon status`` reports, from the registry: one summary per stage, or one stage in full.

:func:`plan_status` and :func:`stage_status` build the JSON documents of ``status --json``
(keys in the README) from a plan's progress, its ``metrics.jsonl`` and the lineage of its
versions; :mod:`server.status_view` prints them as tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.errors import CoordinatorError
from server.registry_summary import headline_metric
from unicon_model.cli_output import error

if TYPE_CHECKING:
    from server.registry import Registry


def real(value: object) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _numbers(values: object) -> dict[str, float]:
    """The entries of a mapping whose values are numbers (a damaged record gives ``{}``)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): v for k, v in ((k, real(v)) for k, v in values.items()) if v is not None}


def _site_names(value: object) -> list[str]:
    return [str(s) for s in value] if isinstance(value, list) else []


@dataclass
class _StageRecords:
    """What ``metrics.jsonl`` says about one stage."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None


def _stage_records(registry: Registry, plan: str) -> dict[str, _StageRecords]:
    """The round and evaluation records of every stage, in the order stages appear."""
    log = registry.read_metrics(plan)
    for warning in log.warnings:
        error(f"warning: {warning}", style="yellow")
    stages: dict[str, _StageRecords] = {}
    for record in log.records:
        stage = record.get("stage")
        if not isinstance(stage, str):
            continue
        if record.get("kind") == "round":
            stages.setdefault(stage, _StageRecords()).rounds.append(record)
        elif record.get("kind") == "evaluation":
            stages.setdefault(stage, _StageRecords()).evaluation = record
    return stages


def _worst(fairness: object, route: str | None) -> tuple[str, float] | None:
    """The worst site of ``route`` and its metric, from an evaluation record's ``fairness``."""
    entry = fairness.get(route) if isinstance(fairness, dict) and route else None
    if not isinstance(entry, dict):
        return None
    site, value = entry.get("worst_site"), real(entry.get("worst"))
    return (site, value) if isinstance(site, str) and value is not None else None


def _fairness_rows(fairness: object) -> dict[str, dict[str, Any]]:
    """``fairness`` of an evaluation record: route -> worst site, worst, best - worst gap."""
    out: dict[str, dict[str, Any]] = {}
    for route, entry in fairness.items() if isinstance(fairness, dict) else ():
        worst = _worst(fairness, route)
        if worst is not None:
            gap = real(entry.get("gap"))
            out[str(route)] = {"worst_site": worst[0], "worst": worst[1], "gap": gap}
    return out


def plan_status(registry: Registry, plan: str) -> dict[str, Any]:
    """A plan's progress and one summary per stage (``status --json``; keys in the README)."""
    progress = registry.progress(plan)
    records = _stage_records(registry, plan)
    names = [c.stage for c in progress.completed]
    if progress.current is not None and progress.current.stage not in names:
        names.append(progress.current.stage)
    rows: list[dict[str, Any]] = []
    previous: set[str] = set()
    for name in names:
        done = next((c for c in progress.completed if c.stage == name), None)
        found = records.get(name, _StageRecords())
        last = found.rounds[-1] if found.rounds else {}
        pooled = _numbers((found.evaluation or {}).get("pooled"))
        metric = headline_metric(pooled, previous)
        if metric is None and real(last.get("val_score")) is not None:
            metric = ("val/score", float(last["val_score"]))
        if pooled:
            previous = set(pooled)
        worst = _worst((found.evaluation or {}).get("fairness"), metric[0] if metric else None)
        sites = _site_names(last.get("sites"))
        planned = real(last.get("rounds"))
        round_ = real(last.get("round"))
        if round_ is None and done is None and progress.current is not None:
            round_ = float(progress.current.round) or None
        rows.append(
            {
                "stage": name,
                "state": "done" if done else "in progress",
                "version": done.version if done else None,
                "sites": sites,
                "site_count": len(sites),
                "round": None if round_ is None else int(round_),
                "rounds": None if planned is None else int(planned),
                "loss": real(last.get("loss")),
                "metric": metric[0] if metric else None,
                "metric_value": metric[1] if metric else None,
                "worst_site": worst[0] if worst else None,
                "worst": worst[1] if worst else None,
            }
        )
    return {**progress.model_dump(mode="json"), "stages": rows}


def stage_status(registry: Registry, plan: str, stage: str) -> dict[str, Any]:
    """One stage in full (``status --stage NAME --json``; keys in the README).

    Raises
    ------
    CoordinatorError
        The plan has no record of ``stage``, naming the stages it has.
    """
    summary = plan_status(registry, plan)
    row = next((r for r in summary["stages"] if r["stage"] == stage), None)
    if row is None:
        known = [r["stage"] for r in summary["stages"]]
        raise CoordinatorError(
            f"plan {plan!r} has no stage {stage!r} in {registry.root} (stages run so far: "
            f"{known}); see `unicon status --plan {plan}`"
        )
    found = _stage_records(registry, plan).get(stage, _StageRecords())
    epsilon: dict[str, float] = {}
    metrics: dict[str, float] = {}
    if row["version"] is not None:
        lineage = registry.manifest(row["version"]).lineage
        epsilon, metrics = dict(lineage.epsilon), dict(lineage.metrics)
    evaluation = found.evaluation or {}
    per_site = evaluation.get("per_site")
    recorded = evaluation.get("unseen")
    unseen: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    unseen_sites = unseen.get("per_site")
    return {
        "plan": plan,
        **row,
        "round_records": [
            {
                "round": real(r.get("round")),
                "sites": _site_names(r.get("sites")),
                "loss": real(r.get("loss")),
                "val_score": real(r.get("val_score")),
                "wall_s": real(r.get("wall_s")),
            }
            for r in found.rounds
        ],
        "pooled": _numbers(evaluation.get("pooled")),
        "per_site": {
            str(site): _numbers(values)
            for site, values in (per_site.items() if isinstance(per_site, dict) else ())
        },
        "fairness": _fairness_rows(evaluation.get("fairness")),
        "unseen": {
            "pooled": _numbers(unseen.get("pooled")),
            "per_site": {
                str(site): _numbers(values)
                for site, values in (unseen_sites.items() if isinstance(unseen_sites, dict) else ())
            },
        },
        "epsilon": epsilon,
        "lineage_metrics": metrics,
    }
