"""The report: matrix assembly, continual metrics against hand-computed values, files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from simulations.report import (
    _stage_series,
    _unseen_plot,
    continual_metrics,
    method_result,
    results_matrix,
    unseen_plot_data,
    write_report,
)

REGISTRY_RESULTS = {
    "stages": ["s1", "s2", "s3"],
    "R": [
        {"a@ct": 0.8},
        {"a@ct": 0.7, "b@ct": 0.6},
        {"a@ct": 0.5, "b@ct": 0.65, "c@pet": 0.9},
    ],
    "R_per_site": {
        "h1": {"s1": {"a@ct": 0.9}, "s2": {"a@ct": 0.8, "b@ct": 0.5}, "s3": {"a@ct": 0.6}},
        "h2": {"s3": {"c@pet": 0.9}},
    },
    "bytes_up": {"h1": 100, "h2": 50},
    "bytes_down": {"h1": 300, "h2": 200},
    "epsilon": {"h1": 1.5, "h2": 0.0},
}


def test_matrix_and_continual_metrics_by_hand() -> None:
    columns, matrix = results_matrix(REGISTRY_RESULTS["stages"], REGISTRY_RESULTS["R"])
    assert columns == ["a@ct", "b@ct", "c@pet"]
    assert np.isnan(matrix[0, 1]) and matrix[2, 2] == 0.9
    acc, bwt, forgetting = continual_metrics(matrix)
    # ACC: mean of the last row; BWT: mean over tasks learned before the last stage of
    # (final - just learned) = ((0.5 - 0.8) + (0.65 - 0.6)) / 2; forgetting: mean over those
    # tasks of (best before the last stage - final) = ((0.8 - 0.5) + (0.6 - 0.65)) / 2
    assert acc == pytest.approx((0.5 + 0.65 + 0.9) / 3)
    assert bwt == pytest.approx(((0.5 - 0.8) + (0.65 - 0.6)) / 2)
    assert forgetting == pytest.approx(((0.8 - 0.5) + (0.6 - 0.65)) / 2)


def test_method_result_aligns_sites_and_writes_every_file(tmp_path: Path) -> None:
    rounds = [{"stage": "s1", "round": 1, "loss": 0.9}, {"stage": "s1", "round": 2, "loss": 0.7}]
    result = method_result("unicon", REGISTRY_RESULTS, rounds, wall_s=12.5)
    assert result.R_per_site["h1"][1][:2] == [0.8, 0.5]
    assert math.isnan(result.R_per_site["h1"][2][1])  # h1 lost b@ct at s3: a gap, not zero
    assert result.R_per_site["h2"][2] == [pytest.approx(float("nan"), nan_ok=True)] * 2 + [0.9]
    write_report(tmp_path, "plan-x", {"unicon": result}, notes=["synthetic"])
    payload = json.loads((tmp_path / "results.json").read_text())
    unicon = payload["methods"]["unicon"]
    assert unicon["R"][0] == [0.8, None, None]
    assert unicon["acc"] == pytest.approx(result.acc) and unicon["wall_s"] == 12.5
    assert unicon["bytes_up"] == {"h1": 100, "h2": 50}
    for name in ("report.md", "R_heatmap.png", "rounds.png", "sites.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "R_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| s3 | 0.500 | 0.650 | 0.900 |" in report


def test_rounds_plot_and_results_hold_validation_and_name_the_aggregation(tmp_path: Path) -> None:
    # s1 validated every round and kept round 2; s2 not validated (its last round is kept);
    # round 2 of s1 was recorded twice (a resume): the later record counts
    rounds = [
        {"stage": "s1", "round": 1, "loss": 0.9, "val_score": 0.5, "best_round": 1},
        {"stage": "s1", "round": 2, "loss": 0.8, "val_score": 0.6, "best_round": 2},
        {"stage": "s1", "round": 2, "loss": 0.7, "val_score": 0.7, "best_round": 2},
        {"stage": "s1", "round": 3, "loss": 0.6, "val_score": None, "best_round": 2},
        {"stage": "s2", "round": 1, "loss": 1.2},
        {"stage": "s3", "round": 1, "loss": 1.0, "best_round": 1, "keep_best": False},
        {"stage": "s3", "round": 2, "loss": 0.9, "best_round": 1, "keep_best": False},
    ]
    result = method_result("unicon", REGISTRY_RESULTS, rounds, wall_s=1.0)
    assert _stage_series(rounds, "s1", "val_score") == ([1, 2], [0.5, 0.7])
    write_report(tmp_path, "plan-x", {"unicon": result})
    payload = json.loads((tmp_path / "results.json").read_text())
    unicon = payload["methods"]["unicon"]
    assert [r.get("val_score") for r in unicon["rounds"][:4]] == [0.5, 0.6, 0.7, None]
    assert unicon["kept_rounds"] == {"s1": 2, "s2": 1, "s3": 2}
    # "pooled" is named for what it is, in results.json and the report
    assert payload["R_aggregation"].startswith("case-weighted mean of site metrics")
    report = (tmp_path / "report.md").read_text()
    assert "case-weighted mean of site metrics" in report and "pooled, test" not in report
    assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TRUSTED = {
    **REGISTRY_RESULTS,
    "R_ci": [
        {"a@ct": [0.7, 0.9]},
        {"a@ct": [0.6, 0.8], "b@ct": [0.5, 0.7]},
        # c@pet: a malformed interval (lo > hi) is dropped, not shown
        {"a@ct": [0.4, 0.6], "b@ct": [0.55, 0.75], "c@pet": [0.95, 0.85]},
    ],
    "R_per_site_ci": {"h1": {"s3": {"a@ct": [0.5, 0.7]}}, "h2": {"s3": {"c@pet": [0.8, 1.0]}}},
    "R_ci_method": "95% intervals (test)",
    "fairness": [
        {},
        {},
        {
            "a@ct": {
                "worst_site": "h1",
                "worst": 0.6,
                "best_site": "h1",
                "best": 0.6,
                "gap": 0.0,
                "sd": 0.0,
                "sites": 1,
                "per_site": {"h1": {"sensitivity": 0.75, "specificity": 0.5}},
            }
        },
    ],
    "calibration": [
        {},
        {},
        {
            "a@ct": {
                "ece": 0.12,
                "brier": 0.2,
                "ece_merged": 0.1,
                "reliability": {
                    "counts": [0, 4, 6],
                    "confidence": [None, 0.5, 0.8],
                    "accuracy": [None, 0.5, 0.6],
                },
            },
            "b@ct": {"ibs": 0.18},
        },
    ],
}


def test_intervals_fairness_and_calibration_reach_results_report_and_plots(
    tmp_path: Path,
) -> None:
    result = method_result("unicon", TRUSTED, [], wall_s=1.0)
    assert result.R_ci[1] == [[0.6, 0.8], [0.5, 0.7], None]
    assert result.R_ci[2][2] is None  # lo > hi: refused
    assert result.R_per_site_ci["h2"][2] == [None, None, [0.8, 1.0]]
    write_report(tmp_path, "plan-x", {"unicon": result})
    unicon = json.loads((tmp_path / "results.json").read_text())["methods"]["unicon"]
    assert len(unicon["R_ci"]) == len(unicon["R"]) and unicon["R_ci"][0] == [[0.7, 0.9], None, None]
    assert unicon["fairness"]["a@ct"]["worst_site"] == "h1"
    assert unicon["calibration"]["a@ct"]["reliability"]["counts"] == [0, 4, 6]
    assert unicon["R_ci_method"] == "95% intervals (test)"
    report = (tmp_path / "report.md").read_text()
    assert "| s3 | 0.500 [0.400, 0.600] | 0.650 [0.550, 0.750] | 0.900 |" in report
    assert "| a@ct | h1 | 0.600 | 0.000 | 0.000 | 1 |" in report
    assert "| a@ct | h1 | 0.750 | 0.500 |" in report  # sensitivity, specificity
    assert "| a@ct | 0.500 | 0.120 | 0.100 | 0.200 | – |" in report
    assert "| b@ct | 0.650 | – | – | – | 0.180 |" in report
    assert "Intervals `[lo, hi]`: 95% intervals (test)" in report
    for name in ("fairness.png", "reliability.png", "sites.png", "R_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "unseen.png").exists()  # no held-out site: no unseen plot
    assert "unseen.png" not in report


def test_fairness_without_a_coordinator_record_comes_from_the_site_metrics() -> None:
    # a baseline assembled outside the coordinator: worst/best/gap from R_per_site
    result = method_result("local", REGISTRY_RESULTS, [], wall_s=1.0)
    assert result.fairness["a@ct"]["worst_site"] == "h1"
    assert result.fairness["c@pet"]["gap"] == 0.0
    assert math.isnan(result.fairness["a@ct"]["sd"])  # no case counts: no weighted SD
    assert result.R_ci == [[None] * 3] * 3  # an older results.json: no intervals, no crash


def test_compare_marks_intervals_that_do_not_overlap(tmp_path: Path) -> None:
    unicon = method_result("unicon", TRUSTED, [], wall_s=1.0)
    other = {**TRUSTED, "R_ci": [{}, {}, {"a@ct": [0.65, 0.8], "b@ct": [0.6, 0.7]}]}
    naive = method_result("naive", other, [], wall_s=1.0)
    write_report(tmp_path, "plan-x", {"unicon": unicon, "naive": naive})
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["comparisons"]["intervals_disjoint"] == {"naive": {"a@ct": True, "b@ct": False}}
    report = (tmp_path / "report.md").read_text()
    assert "| naive | 0.500 [0.650, 0.800] † | 0.650 [0.600, 0.700] | 0.900 |" in report
    assert "not a paired test" in report
    assert (tmp_path / "methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


HELD_OUT = {
    **TRUSTED,
    "holdout_sites": ["h9"],
    # h9 scored a@ct after s2 and a@ct, b@ct after s3; it has no PET (c@pet absent)
    "unseen": [{}, {"a@ct": 0.4}, {"a@ct": 0.3, "b@ct": 0.55}],
    "unseen_ci": [{}, {"a@ct": [0.2, 0.6]}, {"a@ct": [0.1, 0.5]}],
    "unseen_per_site": {"h9": {"s2": {"a@ct": 0.4}, "s3": {"a@ct": 0.3, "b@ct": 0.55}}},
}


def test_unseen_plot_shows_federation_next_to_the_unseen_site_after_the_last_stage(
    tmp_path: Path,
) -> None:
    result = method_result("unicon", HELD_OUT, [], wall_s=1.0)
    rows = unseen_plot_data(result)
    # last stage only, in column order; c@pet left out (the held-out site has no PET)
    assert [row["task"] for row in rows] == ["a@ct", "b@ct"]
    a, b = rows
    assert (a["federation"], a["federation_ci"]) == (0.5, [0.4, 0.6])
    assert (a["unseen"], a["unseen_ci"]) == (0.3, [0.1, 0.5])
    assert a["drop"] == pytest.approx(0.2)
    assert (b["federation"], b["federation_ci"]) == (0.65, [0.55, 0.75])
    assert (b["unseen"], b["unseen_ci"]) == (0.55, None)  # no interval sent: none drawn
    write_report(tmp_path, "plan-x", {"unicon": result})
    assert (tmp_path / "unseen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![unseen hospital](unseen.png)" in (tmp_path / "report.md").read_text()


def test_unseen_plot_is_written_only_for_a_run_with_a_held_out_site(tmp_path: Path) -> None:
    # (write_report without a held-out site: see the intervals test above, no unseen.png)
    assert unseen_plot_data(method_result("unicon", TRUSTED, [], wall_s=1.0)) == []
    # held out, but the site reported nothing after the last stage: the plot says so
    silent = method_result("unicon", {**HELD_OUT, "unseen": [{}, {"a@ct": 0.4}, {}]}, [], 1.0)
    assert unseen_plot_data(silent) == []
    _unseen_plot(silent, tmp_path / "unseen.png")
    assert (tmp_path / "unseen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_box_prompted_dice_reaches_results_and_the_report_beside_r(tmp_path: Path) -> None:
    prompted = {**TRUSTED, "dice_prompted": [{}, {"b@ct": 0.8}, {"b@ct": 0.85}]}
    result = method_result("unicon", prompted, [], wall_s=1.0)
    assert result.R[2] == [0.5, 0.65, 0.9]  # R unchanged: the unprompted Dice
    assert result.dice_prompted[2][1] == 0.85 and math.isnan(result.dice_prompted[0][1])
    write_report(tmp_path, "plan-x", {"unicon": result})
    unicon = json.loads((tmp_path / "results.json").read_text())["methods"]["unicon"]
    assert unicon["dice_prompted"] == [[None] * 3, [None, 0.8, None], [None, 0.85, None]]
    report = (tmp_path / "report.md").read_text()
    assert "| s2 | b@ct | 0.600 | 0.800 | +0.200 |" in report
    assert "| s3 | b@ct | 0.650 | 0.850 | +0.200 |" in report
    # a run without a prompted route has neither the key nor the table
    plain = method_result("unicon", TRUSTED, [], wall_s=1.0)
    assert plain.dice_prompted == [] and "dice_prompted" not in plain.to_json()
