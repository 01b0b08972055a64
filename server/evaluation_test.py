"""Pooling of a box-prompted route's ``dice_prompted`` beside its Dice, from hand-made replies."""

from __future__ import annotations

import math

import pytest

from server.evaluation import PROMPTED_METRIC, pool_evaluation, pooled_extra
from server.results import add_stage_results, new_results
from server.sites import SiteLedger
from server.transport import Incoming
from unicon_model.schema import TaskSpec

SEG = TaskSpec(name="lesion-seg", kind="segmentation", labels=("background", "lesion"))
PROMPTED = SEG.model_copy(update={"prompt": "box"})
CLS = TaskSpec(name="lesion-class", kind="classification", classes=("benign", "malignant"))
ROUTE = "lesion-seg@ct"
# site -> (dice, dice_prompted, test cases); hospital-c sent no dice_prompted
SITES = {
    "hospital-a": (0.30, 0.70, 4.0),
    "hospital-b": (0.50, 0.80, 6.0),
    "hospital-c": (0.20, None, 10.0),
}


def _replies() -> tuple[list[Incoming], dict[int, SiteLedger]]:
    replies, ledgers = [], {}
    for node, (site, (dice, boxed, n)) in enumerate(SITES.items(), start=1):
        metrics = {f"{ROUTE}/dice": dice, f"{ROUTE}/n": n, "lesion-class@ct/accuracy": 0.9}
        metrics["lesion-class@ct/n"] = n
        if boxed is not None:
            metrics[f"{ROUTE}/{PROMPTED_METRIC}"] = boxed
        replies.append(Incoming(node_id=node, metrics=metrics))
        ledgers[node] = SiteLedger(
            node_id=node, site=site, capabilities={"counts": {"cases": {"test": 20}}}
        )
    return replies, ledgers


def test_dice_prompted_is_the_case_weighted_mean_beside_an_unchanged_dice() -> None:
    replies, ledgers = _replies()
    tasks = {"lesion-seg": PROMPTED, "lesion-class": CLS}
    evaluation = pool_evaluation(replies, {}, ledgers, tasks, "test", set())
    # by hand: the sites that sent it, weighted by their cases
    assert evaluation[PROMPTED_METRIC] == {ROUTE: pytest.approx((0.70 * 4 + 0.80 * 6) / 10)}
    # R's value stays the unprompted Dice over all three sites
    assert evaluation["pooled"][ROUTE] == pytest.approx((0.30 * 4 + 0.50 * 6 + 0.20 * 10) / 20)
    assert set(evaluation["pooled"]) == {ROUTE, "lesion-class@ct"}


def test_no_prompted_route_adds_no_key_and_bad_values_are_left_out() -> None:
    replies, ledgers = _replies()
    for reply in replies:
        reply.metrics.pop(f"{ROUTE}/{PROMPTED_METRIC}", None)
    evaluation = pool_evaluation(replies, {}, ledgers, {"lesion-seg": SEG}, "test", set())
    assert PROMPTED_METRIC not in evaluation
    accepted = {
        "a": {ROUTE: {"n": 2.0, PROMPTED_METRIC: 0.5}},
        "b": {ROUTE: {"n": 3.0, PROMPTED_METRIC: math.nan}},  # not finite: left out
        "c": {ROUTE: {"n": 0.0, PROMPTED_METRIC: 0.9}},  # no cases: left out
    }
    assert pooled_extra(accepted, PROMPTED_METRIC) == {ROUTE: 0.5}


def test_results_json_gets_dice_prompted_rows_beside_r() -> None:
    replies, ledgers = _replies()
    tasks = {"lesion-seg": PROMPTED}
    evaluation = pool_evaluation(replies, {}, ledgers, tasks, "test", set())
    results = new_results()
    add_stage_results(results, "organ", {"pooled": {"x@ct": 0.5}, "per_site": {}})
    assert "dice_prompted" not in results  # no prompted route yet: no rows
    add_stage_results(results, "lesion", evaluation)
    assert results["dice_prompted"] == [{}, evaluation[PROMPTED_METRIC]]  # padded to R
    assert results["R"][1][ROUTE] == evaluation["pooled"][ROUTE]  # R stays `dice`
    add_stage_results(results, "later", {"pooled": {ROUTE: 0.4}, "per_site": {}})
    assert len(results["dice_prompted"]) == len(results["R"]) == 3
