"""The benchmarks' pure parts: steady-state overhead, plans, upload fractions, one-class sites."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from simulations.bench import (
    FOUNDATION,
    PROGNOSIS,
    TINY_MODEL,
    bench_plan,
    evaluation_requests,
    main,
    one_class_sites,
    steady_state,
    upload_fractions,
)
from simulations.bench_bootstrap import bootstrap_figure
from simulations.synthetic import make_sites
from unicon_model.model import UniconModel
from unicon_model.schema import validate_plan


def _round(number: int, wall: float, coordinator: dict[str, float], sites: dict) -> dict:
    return {
        "kind": "round",
        "round": number,
        "wall_s": wall,
        "timing": {"coordinator": coordinator, "sites": sites},
    }


# Round 1 (caches cold) and a record without timing (an older run) are left out.
# Round 2: site work (train + eval) 1.5, 2.5 and 2.0 s: sum 6.0, largest 2.5.
# Round 3: site work 4.0 and 1.0 s: sum 5.0, largest 4.0.
ROUNDS = [
    _round(1, 30.0, {"request_s": 9.0}, {"a": {"train_s": 20.0}}),
    _round(
        2,
        6.0,
        {"request_s": 0.2, "train_wait_s": 4.5},
        {
            "a": {"train_s": 1.0, "eval_s": 0.5, "persist_s": 0.2},
            "b": {"train_s": 2.0, "eval_s": 0.5},
            "c": {"train_s": 2.0},
        },
    ),
    _round(
        3,
        10.0,
        {"request_s": 0.4, "train_wait_s": 8.0},
        {"a": {"train_s": 3.0, "eval_s": 1.0}, "b": {"train_s": 1.0}},
    ),
    {"kind": "round", "round": 4, "wall_s": 99.0},
]


@pytest.mark.parametrize(
    ("workers", "overhead"),
    [
        (1, (6.0 / 6.0 + 10.0 / 5.0) / 2),  # sequential: wall / summed work = 1.0, 2.0
        (None, (6.0 / 2.5 + 10.0 / 4.0) / 2),  # one worker each: wall / largest = 2.4, 2.5
        (2, (6.0 / 3.0 + 10.0 / 4.0) / 2),  # 2 actors: max(largest, sum / 2) = 3.0, 4.0
    ],
)
def test_steady_state_overhead_is_the_mean_over_rounds_two_on(
    workers: int | None, overhead: float
) -> None:
    result = steady_state(ROUNDS, workers=workers)
    assert result["steady_overhead"] == pytest.approx(overhead)
    assert result["steady_round_s"] == pytest.approx(8.0)


def test_steady_state_phases_are_means_per_round_sites_summed() -> None:
    phases = steady_state(ROUNDS, workers=1)["steady_phases"]
    assert list(phases) == sorted(phases)
    assert phases == pytest.approx(
        {
            "coordinator/request_s": (0.2 + 0.4) / 2,
            "coordinator/train_wait_s": (4.5 + 8.0) / 2,
            "sites/eval_s": (1.0 + 1.0) / 2,
            "sites/persist_s": 0.2 / 2,
            "sites/train_s": (5.0 + 4.0) / 2,
        }
    )


def test_steady_state_is_nan_without_a_second_round_or_without_site_work() -> None:
    alone = steady_state(ROUNDS[:1], workers=1)
    assert math.isnan(alone["steady_round_s"]) and math.isnan(alone["steady_overhead"])
    assert alone["steady_phases"] == {}
    idle = steady_state([_round(2, 3.0, {"request_s": 1.0}, {})], workers=None)
    assert idle["steady_round_s"] == 3.0 and math.isnan(idle["steady_overhead"])
    assert idle["steady_phases"] == {"coordinator/request_s": 1.0}


def test_evaluation_requests_skip_rounds_without_validation(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = [
        {"kind": "round", "round": 1, "val": None},
        {"kind": "evaluation", "per_site": {"a": {"x@ct": 0.5}}, "unseen": None},
        {"kind": "evaluation", "per_site": None, "unseen": {"per_site": {"u": {"x@pet": 0.1}}}},
    ]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluation_requests(metrics) == [["x@ct"], ["x@pet"]]


def test_bench_plan_is_the_tiny_model_over_16_cubed_patches() -> None:
    plan = bench_plan([FOUNDATION, PROGNOSIS], "bench-test")
    assert plan.name == "bench-test"
    assert [s.name for s in plan.stages] == ["foundation", "prognosis"]
    assert list(plan.model.widths) == TINY_MODEL["widths"]
    assert list(plan.data.patch_size) == [16, 16, 16]


def test_upload_fractions_are_the_trained_share_of_each_stage_model() -> None:
    raw = {
        "name": "upload",
        "model": TINY_MODEL,
        "data": {"patch_size": [16, 16, 16]},
        "stages": [FOUNDATION, PROGNOSIS],
    }
    fractions = upload_fractions(raw)
    # the foundation stage trains every component the model has then
    assert fractions["foundation"] == 1.0
    # the prognosis stage trains only the survival head it adds
    model = UniconModel.from_plan(validate_plan(raw), through_stage=1)
    head = sum(v.numel() for v in model.tasks["survival"].state_dict().values())
    total = sum(v.numel() for v in model.state_dict().values())
    assert fractions["prognosis"] == pytest.approx(head / total)
    assert 0.0 < fractions["prognosis"] < 0.1


def test_one_class_sites_move_the_other_class_out_of_train(tmp_path: Path) -> None:
    folders = one_class_sites(tmp_path / "one", 2)
    original = make_sites(tmp_path / "orig", sites=2, seed=5, size=16, cases_per_site=8,
                          pet_sites=0)  # fmt: skip
    for wanted, folder, before_path in zip(("benign", "malignant"), folders, original, strict=True):
        after = yaml.safe_load((folder / "manifest.yaml").read_text())["cases"]
        before = yaml.safe_load(before_path.read_text())["cases"]
        assert [c["id"] for c in after] == [c["id"] for c in before]
        train = [c for c in after if c["split"] == "train"]
        assert train and {c["labels"]["lesion-class"] for c in train} == {wanted}
        for old, new in zip(before, after, strict=True):
            moved = old["split"] == "train" and old["labels"]["lesion-class"] != wanted
            assert new["split"] == ("val" if moved else old["split"])


def test_main_without_parts_writes_an_empty_results_file(tmp_path: Path) -> None:
    assert main(tmp_path / "bench", system=False, learning=False) == {}
    assert json.loads((tmp_path / "bench" / "results.json").read_text()) == {}


class _FakeLearning:
    """Stands in for ``bench.bench_learning``: returns ``learning``, records each call's
    keyword arguments."""

    def __init__(self, learning: dict[str, Any]) -> None:
        self.learning = learning
        self.calls: list[dict[str, Any]] = []

    def __call__(self, work: Path, **options: Any) -> dict[str, Any]:
        self.calls.append(options)
        return dict(self.learning)


def test_make_bench_adds_the_new_structures_row_to_the_learning_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rich.console import Console

    from simulations import bench

    learning = {
        "scenario": "quick",
        "bwt": {"unicon": 0.0, "naive": -0.1},
        "forgetting": {"unicon": 0.0, "naive": 0.1},
        "federated_over_centralised": {},
        "final": {},
        "dp_utility": {},
        "repeats": {
            "unicon_minus_best_baseline": {
                "survival@ct": {
                    "method": "lwf",
                    "difference": 0.02,
                    "low": -0.01,
                    "high": 0.05,
                    "unicon": [0.7, 0.71, 0.72],
                    "baseline": [0.69, 0.69, 0.69],
                },
                "lesion-class@ct": {  # every run at the majority class: no interval
                    "method": "naive",
                    "difference": 0.0,
                    "low": math.nan,
                    "high": math.nan,
                    "unicon": [0.653] * 3,
                    "baseline": [0.653] * 3,
                },
            }
        },
    }
    calls: list[tuple[Path, bool]] = []

    def new_structures(work: Path, *, quick: bool) -> dict[str, Any]:
        calls.append((work, quick))
        return {"error": "not run here"}

    bench_learning = _FakeLearning(learning)
    monkeypatch.setattr(bench, "bench_learning", bench_learning)
    monkeypatch.setattr(bench, "new_structures_gain", new_structures)
    monkeypatch.setattr(bench, "console", Console(record=True, width=200))
    results = main(tmp_path / "bench", system=False, learning=True, quick_learning=True, repeats=5)
    assert [quick for _, quick in calls] == [True]
    assert [(c["repeats"], c["extras"], c["plan"]) for c in bench_learning.calls] == [
        (5, True, None)
    ]
    assert results["learning"]["new_structures"] == {"error": "not run here"}
    written = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert written["learning"]["new_structures"] == {"error": "not run here"}
    text = bench.console.export_text()
    assert "new structures" in text
    assert "over 3 runs each, survival@ct" in text
    assert "+0.020 [-0.010, +0.050] (best mean: lwf)" in text
    assert "+0.000 (no interval: no spread over the runs) (best mean: naive)" in text
    assert "nan" not in text


def test_bench_full_scope_runs_only_the_target_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--only targets`` (make bench-full): the learning comparison without its extras, no
    new-structures, new-labels or system benchmarks, and a table without DP rows."""
    from rich.console import Console

    from simulations import bench

    learning = {
        "scenario": "default",
        "scope": "targets",
        "bwt": {"unicon": 0.0, "naive": -0.01},
        "forgetting": {"unicon": 0.0, "naive": 0.01},
        "federated_over_centralised": {"lesion-seg@ct": 0.95},
        "final": {"unicon": {"lesion-seg@ct": 0.5}, "centralised": {"lesion-seg@ct": 0.526}},
        "upload_fraction": {"segmentation": 0.238},
        # one run per method: no interval, and no row of its own
        "repeats": {
            "unicon_minus_best_baseline": {
                "lesion-seg@ct": {
                    "method": "naive",
                    "difference": 0.01,
                    "low": math.nan,
                    "high": math.nan,
                    "unicon": [0.5],
                    "baseline": [0.49],
                }
            }
        },
    }
    bench_learning = _FakeLearning(learning)

    def not_in_scope(work: Path, *, quick: bool) -> dict[str, Any]:
        raise AssertionError("an extra benchmark ran in the targets scope")

    monkeypatch.setattr(bench, "bench_learning", bench_learning)
    monkeypatch.setattr(bench, "new_structures_gain", not_in_scope)
    monkeypatch.setattr(bench, "label_extension_gain", not_in_scope)
    monkeypatch.setattr(bench, "console", Console(record=True, width=200))
    plan = tmp_path / "other.toml"
    results = main(tmp_path / "bench", system=False, learning=True, targets_only=True, plan=plan)
    assert [(c["extras"], c["plan"]) for c in bench_learning.calls] == [(False, plan)]
    assert set(results) == {"learning"}
    assert "new_structures" not in results["learning"]
    text = bench.console.export_text()
    assert "0.500 / 0.526 = 0.950" in text
    assert "DP utility" not in text
    assert "over 1 runs" not in text and "nan" not in text


def test_the_bootstrap_row_says_when_no_simulate_run_was_there_to_divide_by() -> None:
    boot = {"run_bootstrap_s": 1.5, "requests": 40, "simulate_wall_s": 300.0}
    assert bootstrap_figure({**boot, "share_of_simulate": 0.005}) == (
        "1.500 s over 40 evaluation requests = 0.500% of 300 s"
    )
    missing = bootstrap_figure({**boot, "simulate_wall_s": math.nan, "share_of_simulate": math.nan})
    assert "nan" not in missing and "no make simulate run" in missing
