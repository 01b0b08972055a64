"""Issue 14: intervals, fairness and calibration from real site replies into results.json.

The model is the untrained grown model of three stages (no training round runs), evaluated
by the real in-process sites: fast, and every route kind sends its extras.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from server.coordinator import Coordinator
from server.registry import Registry
from simulations.inprocess import InProcessTransport
from simulations.report import method_result
from tests.conftest import tiny_plan
from unicon_model.metrics.uncertainty import Z_95
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan

SITES = ["hospital-a", "hospital-b", "hospital-c"]
ROUTES = {"lesion-class@ct", "survival@ct", "lesion-seg@ct"}


@pytest.fixture(scope="module")
def evaluated(
    sites_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Coordinator, dict]:
    raw = tiny_plan()
    raw["stages"] = raw["stages"][:3]
    plan = validate_plan(raw)
    tmp = tmp_path_factory.mktemp("trust")
    transport = InProcessTransport([sites_dir / s for s in SITES], tmp / "site-state")
    coordinator = Coordinator(plan, Registry(tmp / "registry"), transport, site_wait=0)
    model = UniconModel(plan.model)
    for stage in plan.stages:
        model.grow(stage)
    evaluation = coordinator.evaluate(2, model)
    coordinator._record_results(2, evaluation)
    return coordinator, evaluation


def test_every_pooled_and_site_entry_has_an_interval_around_it(
    evaluated: tuple[Coordinator, dict],
) -> None:
    _, evaluation = evaluated
    assert set(evaluation["pooled"]) == ROUTES == set(evaluation["pooled_ci"])
    for route, (lo, hi) in evaluation["pooled_ci"].items():
        assert 0.0 <= lo <= evaluation["pooled"][route] <= hi <= 1.0
    for site, row in evaluation["per_site"].items():
        for route, value in row.items():
            if not math.isfinite(value):  # e.g. a C-index without a comparable pair
                assert route not in evaluation["per_site_ci"].get(site, {})
                continue
            lo, hi = evaluation["per_site_ci"][site][route]
            assert lo <= value <= hi or math.isclose(value, lo) or math.isclose(value, hi)
    # the pooled half-width is 1.96 * sqrt(sum w_i^2 se_i^2) (unless clipped)
    route = "lesion-class@ct"
    n = {s: evaluation["per_site_n"][s][route] for s in evaluation["per_site_n"]}
    se = {s: evaluation["per_site_se"][s][route] for s in n}
    total = sum(n.values())
    expected = Z_95 * math.sqrt(sum((n[s] / total) ** 2 * se[s] ** 2 for s in n))
    lo, hi = evaluation["pooled_ci"][route]
    mean = evaluation["pooled"][route]
    assert lo == pytest.approx(max(0.0, mean - expected))
    assert hi == pytest.approx(min(1.0, mean + expected))


def test_results_json_holds_intervals_fairness_and_calibration(
    evaluated: tuple[Coordinator, dict],
) -> None:
    coordinator, evaluation = evaluated
    results = coordinator.registry.results(coordinator.plan.name)
    assert len(results["R_ci"]) == len(results["R"]) == 1
    assert results["R_ci"][0] == evaluation["pooled_ci"]
    assert set(results["R_per_site_ci"]) == set(SITES)
    assert "bootstrap" in results["R_ci_method"] and "B=200" in results["R_ci_method"]
    fairness = results["fairness"][0]
    assert set(fairness) == ROUTES
    worst = fairness["lesion-class@ct"]
    site_values = {s: evaluation["per_site"][s]["lesion-class@ct"] for s in SITES}
    assert worst["worst"] == min(site_values.values())
    assert worst["gap"] == pytest.approx(max(site_values.values()) - worst["worst"])
    assert set(worst["per_site"][SITES[0]]) == {"sensitivity", "specificity"}
    calibration = results["calibration"][0]
    assert {"ece", "brier", "reliability"} <= set(calibration["lesion-class@ct"])
    total = sum(evaluation["per_site_n"][s]["lesion-class@ct"] for s in SITES)
    assert sum(calibration["lesion-class@ct"]["reliability"]["counts"]) == total
    assert 0.0 <= calibration["survival@ct"]["ibs"] <= 1.0
    # the report reads it back
    report = method_result("unicon", {**results, "stages": ["segmentation"]}, [], 1.0)
    assert report.R_ci[0][report.tasks.index("survival@ct")] is not None
    assert report.fairness["lesion-seg@ct"]["sites"] == 3
