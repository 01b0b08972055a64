"""A plan's ``results.json``: one row per completed stage of its test evaluation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Required, TypedDict, cast

from unicon_model.metrics.uncertainty import CI_METHOD

if TYPE_CHECKING:
    from server.registry import Registry
    from server.sites import SiteLedger

AGGREGATION = (
    "case-weighted mean of site metrics: each site computes the metric over its own cases and "
    "the coordinator averages the sites' values weighted by their case counts (not one metric "
    "over the pooled cases, which would need per-case predictions and labels the sites do not "
    "release)"
)
"""What every "pooled" value (R, the validation score) is, as written in results and records."""

Row = dict[str, Any]
"""``task@modality`` -> a value (or its interval, or its statistics) of one stage."""
SiteRows = dict[str, dict[str, Any]]
"""Site -> stage -> :data:`Row`."""
RowKey = Literal["R_ci", "fairness", "calibration", "dice_prompted", "unseen", "unseen_ci"]
"""The keys of :class:`RunResults` that hold one row per R row."""
SiteRowsKey = Literal[
    "R_per_site_ci", "R_per_site_se", "R_per_site_n", "unseen_per_site", "unseen_per_site_ci"
]
"""The keys of :class:`RunResults` that hold :data:`SiteRows` beside ``R_per_site``."""


class RunResults(TypedDict, total=False):
    """``results.json`` of a plan, as the coordinator writes it (key order is the file's).

    ``stages``, ``R`` and ``R_per_site`` are always there; a results.json of an older
    version may lack any other key. The ``unseen`` keys and ``holdout_sites`` are there only
    when the plan holds sites out; ``dice_prompted`` (one row per R row: route -> the
    case-weighted Dice with each case's label box) only when a box-prompted segmentation
    route reported it.
    """

    stages: Required[list[str]]
    R: Required[list[Row]]
    R_per_site: Required[SiteRows]
    R_ci: list[Row]
    fairness: list[Row]
    calibration: list[Row]
    dice_prompted: list[Row]
    R_per_site_ci: SiteRows
    R_per_site_se: SiteRows
    R_per_site_n: SiteRows
    holdout_sites: list[str]
    unseen: list[Row]
    unseen_ci: list[Row]
    unseen_per_site: SiteRows
    unseen_per_site_ci: SiteRows
    R_ci_method: str
    R_aggregation: str
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    epsilon: dict[str, float]


def new_results() -> RunResults:
    """The results of a plan before its first stage completes."""
    return {"stages": [], "R": [], "R_per_site": {}}


def _append_row(results: RunResults, key: RowKey, value: Any) -> None:
    """Append ``value`` to the rows ``key``, padded to one row per R row.

    A results.json of an older version has no such rows: the missing ones are ``{}``.
    """
    rows = results.setdefault(key, [])
    rows += [{}] * (len(results["R"]) - 1 - len(rows))
    rows.append(value)


def _add_site_rows(
    results: RunResults, key: SiteRowsKey, by_site: Mapping[str, Any], stage: str
) -> None:
    """Record each site's ``row`` of ``by_site`` under ``results[key][site][stage]``."""
    for site, row in by_site.items():
        results.setdefault(key, {}).setdefault(site, {})[stage] = row


def add_stage_results(results: RunResults, stage: str, evaluation: Mapping[str, Any]) -> None:
    """Add a completed stage's test evaluation to ``results`` (once; a repeat is ignored).

    ``R`` gets the pooled row and ``R_per_site`` each site's; the intervals, fairness,
    calibration and per-site statistics get their rows alike, ``dice_prompted`` too once a
    box-prompted route reported it, and, only when the plan holds sites out, ``unseen`` rows
    like R's.
    """
    if stage in results["stages"]:
        return
    results["stages"].append(stage)
    results["R"].append(evaluation["pooled"])
    for site, row in evaluation["per_site"].items():
        results["R_per_site"].setdefault(site, {})[stage] = row
    rows: tuple[tuple[RowKey, Any], ...] = (
        ("R_ci", evaluation.get("pooled_ci", {})),
        ("fairness", evaluation.get("fairness", {})),
        ("calibration", evaluation.get("calibration", {})),
    )
    for key, value in rows:
        _append_row(results, key, value)
    prompted = evaluation.get("dice_prompted")
    if prompted or "dice_prompted" in results:  # beside R, never in it (R stays `dice`)
        _append_row(results, "dice_prompted", prompted or {})
    site_rows: tuple[tuple[SiteRowsKey, Any], ...] = (
        ("R_per_site_ci", evaluation.get("per_site_ci", {})),
        ("R_per_site_se", evaluation.get("per_site_se", {})),
        ("R_per_site_n", evaluation.get("per_site_n", {})),
    )
    for site_key, by_site in site_rows:
        _add_site_rows(results, site_key, by_site, stage)
    unseen = evaluation.get("unseen")
    if unseen is not None:  # rows like R's, only when the plan holds sites out
        results["holdout_sites"] = list(unseen["sites"])
        _append_row(results, "unseen", unseen["pooled"])
        _append_row(results, "unseen_ci", unseen["pooled_ci"])
        _add_site_rows(results, "unseen_per_site", unseen["per_site"], stage)
        _add_site_rows(results, "unseen_per_site_ci", unseen["per_site_ci"], stage)


def record_results(
    registry: Registry,
    plan: str,
    stage: str,
    evaluation: Mapping[str, Any],
    sites: Iterable[SiteLedger],
) -> None:
    """Add a completed stage's evaluation to the plan's results and its metrics.

    The results also get how R is pooled and its intervals computed, and each site's bytes
    up and down and ε so far (``sites``).
    """
    stored = registry.results(plan)  # a JSON object, checked by the registry
    results = cast(RunResults, stored) if stored else new_results()
    add_stage_results(results, stage, evaluation)
    ledgers = list(sites)
    results["R_ci_method"] = CI_METHOD
    results["R_aggregation"] = AGGREGATION
    results["bytes_up"] = {s.site: s.bytes_up for s in ledgers}
    results["bytes_down"] = {s.site: s.bytes_down for s in ledgers}
    results["epsilon"] = {s.site: s.epsilon for s in ledgers}
    registry.save_results(plan, dict(results))
    registry.append_metrics(plan, {"kind": "evaluation", "stage": stage, **evaluation})
