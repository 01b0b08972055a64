"""Which sites an analytic update stage may ask: those whose statistics are not in the heads.

A stage with ``update_analytic`` adds statistics to the cumulative ones that analytic heads
keep (:class:`unicon_model.analytic.AnalyticSegmentationHead`, incremental ridge). Statistics
a site already gave must not be added twice, so :func:`counted_sites` reads, from the
registry's round records of the plan's completed stages that fitted those heads, which sites'
statistics were aggregated (the record's ``sites``: accepted replies, plain or SecAgg+);
:func:`server.eligibility.check_site` refuses them for the update stage with that reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from unicon_model.schema import Plan

__all__ = ["counted_sites", "fitting_stages"]


def fitting_stages(plan: Plan, stage_index: int) -> list[str]:
    """The stages before ``stage_index`` that fitted a head the stage updates (added it as an
    analytic head, or updated it)."""
    wanted = set(plan.stages[stage_index].update_analytic)
    return [
        s.name
        for s in plan.stages[:stage_index]
        if wanted & ({t.name for t in s.add_tasks if t.head == "analytic"} | set(s.update_analytic))
    ]


def counted_sites(
    plan: Plan,
    stage_index: int,
    completed: Iterable[str],
    records: Iterable[Mapping[str, Any]],
) -> dict[str, list[str]]:
    """Site -> the completed stages whose aggregated statistics of the updated heads it gave.

    Parameters
    ----------
    plan, stage_index
        The plan and the update stage (a stage without ``update_analytic`` counts no site).
    completed
        The plan's completed stage names (the registry's progress).
    records
        The plan's metric records; the round records (``kind == "round"``) of the fitting
        stages give the sites, the last record of a stage winning (a resumed stage may
        have recorded an earlier attempt).
    """
    fitting = set(fitting_stages(plan, stage_index)) & set(completed)
    last: dict[str, list[str]] = {}
    for record in records:
        stage = record.get("stage")
        if record.get("kind") != "round" or stage not in fitting or record.get("skipped"):
            continue
        sites = record.get("sites")
        last[str(stage)] = [str(s) for s in sites] if isinstance(sites, list) else []
    counted: dict[str, list[str]] = {}
    for stage in fitting_stages(plan, stage_index):
        for site in last.get(stage, []):
            counted.setdefault(site, []).append(stage)
    return counted
