"""The steady-overhead benchmark's pure parts: its row and table from hand-made round records."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from simulations import bench_overhead
from simulations.bench_overhead import (
    WORKLOADS,
    default_model,
    overhead_figure,
    overhead_row,
    overhead_table,
    steady_overhead_only,
)
from simulations.bench_system import TINY_MODEL
from simulations.bench_test import _round

# Round 1 (cold) counts only as the first round. Round 2: site work 1.5 + 0.5 = 2.0 s of
# 4.0 s wall; round 3: 1.0 + 1.0 = 2.0 s of 6.0 s. Sequential: overhead (2 + 3) / 2 = 2.5.
ROUNDS = [
    _round(1, 30.0, {"request_s": 9.0}, {"a": {"train_s": 20.0, "data_s": 5.0}}),
    _round(
        2,
        4.0,
        {"request_s": 0.2, "train_wait_s": 3.0, "checkpoint_s": 0.1},
        {
            "a": {"train_s": 1.0, "eval_s": 0.5, "persist_s": 0.3, "model_s": 0.1},
            "b": {"train_s": 0.5, "persist_s": 0.3, "decode_s": 0.4},
        },
    ),
    _round(
        3,
        6.0,
        {"request_s": 0.4, "train_wait_s": 4.0, "evaluate_wait_s": 1.0, "checkpoint_s": 0.1},
        {
            "a": {"train_s": 0.5, "eval_s": 0.5, "persist_s": 0.5, "model_s": 0.1},
            "b": {"train_s": 1.0, "persist_s": 0.5},
        },
    ),
]


def test_row_overhead_is_wall_over_the_sites_summed_train_and_eval() -> None:
    row = overhead_row(ROUNDS, sites=2)
    assert row["first_round_s"] == 30.0
    assert row["steady_round_s"] == pytest.approx(5.0)
    assert row["site_work_s"] == pytest.approx(2.0)
    assert row["steady_overhead"] == pytest.approx((4.0 / 2.0 + 6.0 / 2.0) / 2)
    assert row["fixed_s_per_site"] == pytest.approx((5.0 - 2.0) / 2)


def test_largest_fixed_phases_leave_out_the_work_and_the_waits_on_it() -> None:
    fixed = overhead_row(ROUNDS, sites=2, top=3)["largest_fixed"]
    assert list(fixed) == ["sites/persist_s", "coordinator/request_s", "sites/decode_s"]
    assert fixed == pytest.approx(
        {"sites/persist_s": 0.8, "coordinator/request_s": 0.3, "sites/decode_s": 0.2}
    )
    every = overhead_row(ROUNDS, sites=2, top=10)["largest_fixed"]
    assert set(every) == {
        "sites/persist_s",
        "coordinator/request_s",
        "sites/decode_s",
        "sites/model_s",
        "coordinator/checkpoint_s",
    }


def test_row_is_nan_with_one_round() -> None:
    row = overhead_row(ROUNDS[:1], sites=1)
    assert row["first_round_s"] == 30.0
    assert math.isnan(row["steady_overhead"]) and math.isnan(row["site_work_s"])
    assert row["largest_fixed"] == {}


def test_table_has_one_line_per_workload() -> None:
    rows = [
        {"workload": "tiny", "size": 16, "cases_per_site": 6, **overhead_row(ROUNDS, sites=2)},
        {"workload": "default", **overhead_row(ROUNDS, sites=2, top=1)},
    ]
    console = Console(record=True, width=250)
    console.print(overhead_table(rows))
    text = console.export_text()
    assert "2 sites" in text and "tiny, 16³, 6 cases/site" in text
    assert "×2.50" in text and "5.00 s" in text and "2.00 s" in text
    assert "persist 0.80, coordinator/request 0.30, decode 0.20" in text
    label, figure = overhead_figure(rows[0])
    assert label == "steady-state overhead, 2 sites, tiny, 16³, 6 cases/site"
    assert figure == (
        "first round 30.00 s; steady 5.00 s/round = ×2.50 the sites' train + eval (2.00 s); "
        "largest fixed: persist 0.80, coordinator/request 0.30, decode 0.20"
    )


def test_workloads_are_the_tiny_model_and_the_default_scenario_model() -> None:
    tiny, default = WORKLOADS["tiny"], WORKLOADS["default"]
    assert tiny.model == TINY_MODEL and tiny.size == 16
    assert default.model is None and default.size == 32
    assert min(tiny.rounds, default.rounds) >= 3
    model = default_model()
    assert model["widths"] == [8, 16, 32] and model["norm"] == "group"
    assert model["adapter_rank"] == 4 and model["head_hidden"] == 32


def test_only_writes_the_rows_and_prints_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations import bench

    def fake(workload: Any, work: Path, *, sites: int) -> dict[str, Any]:
        return {"workload": workload.name, **overhead_row(ROUNDS, sites=sites)}

    monkeypatch.setattr(bench_overhead, "run_workload", fake)
    monkeypatch.setattr(bench, "console", Console(record=True, width=250))
    entry = steady_overhead_only(tmp_path / "bench", sites=2)
    assert [r["workload"] for r in entry["rows"]] == ["tiny", "default"]
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [r["workload"] for r in written["steady_overhead"]["rows"]] == ["tiny", "default"]
    assert "steady-state overhead" in bench.console.export_text()
