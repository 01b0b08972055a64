"""Issue 14, item 3: an unseen hospital, held out of all training and scored after each stage.

The coordinator checks run the real in-process sites on the untrained grown model (no
training round), the CLI checks stop before anything trains or stand in a fake federation,
so every test here is fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from server.coordinator import Coordinator, plan_digest
from server.eligibility import HELD_OUT, holdout_problems
from server.errors import StageError
from server.evaluation import evaluation_lineage_metrics
from server.registry import Registry
from simulations.cli import site_capabilities, summary_json
from simulations.inprocess import InProcessTransport
from simulations.report import method_result, unseen_comparison, write_report
from simulations.synthetic import (
    SCANNER_RANGES,
    SHIFTED_SITE,
    shifted_profile,
    site_profiles,
)
from tests.conftest import tiny_plan
from unicon_cli.main import full_app
from unicon_model.errors import PlanError
from unicon_model.schema import validate_plan

runner = CliRunner()
SITES = ["hospital-a", "hospital-b", "hospital-c"]  # a and b have PET (conftest sites_dir)


def _holdout_plan(site: str = "hospital-b", **stage0: Any) -> dict[str, Any]:
    raw = tiny_plan()
    raw["stages"][0].update(stage0)
    raw["evaluation"] = {"holdout_sites": [site]}
    return raw


# --------------------------------------------------------------------------- plan field


def test_a_plan_without_holdout_serialises_and_digests_as_before() -> None:
    plain = validate_plan(tiny_plan())
    assert "evaluation" not in plain.model_dump_json()  # the same bytes (and digest) as before
    held = validate_plan(_holdout_plan())
    assert held.evaluation.holdout_sites == ("hospital-b",)
    assert plan_digest(held) != plan_digest(plain)
    assert validate_plan(json.loads(held.model_dump_json())) == held  # round-trips


def test_bad_holdout_sites_name_the_field() -> None:
    raw = tiny_plan(evaluation={"holdout_sites": ["hospital-b", "hospital-b"], "bogus": 1})
    with pytest.raises(PlanError) as caught:
        validate_plan(raw)
    text = str(caught.value)
    assert "evaluation.holdout_sites" in text and "more than once" in text
    assert "evaluation.bogus" in text
    with pytest.raises(PlanError, match=r"evaluation\.holdout_sites\[0\]"):
        validate_plan(tiny_plan(evaluation={"holdout_sites": ["../etc"]}))


# --------------------------------------------------------------------------- eligibility


def test_holdout_problems_name_the_unknown_site_and_the_short_stage(sites_dir: Path) -> None:
    caps = site_capabilities([sites_dir / s for s in SITES])
    assert set(caps) == set(SITES)
    ok = validate_plan(_holdout_plan("hospital-c"))
    assert holdout_problems(ok, caps) == []
    raw = _holdout_plan("hospital-b")
    raw["stages"][3]["min_sites"] = 2  # PET at a and b only: holding b out leaves a alone
    problems = holdout_problems(validate_plan(raw), caps)
    assert len(problems) == 1
    assert "stages[3] ('pet')" in problems[0] and "min_sites = 2" in problems[0]
    assert "leaves 1 ['hospital-a']" in problems[0]
    unknown = holdout_problems(validate_plan(_holdout_plan("hospital-z")), caps)
    assert unknown == [
        "holdout site(s) ['hospital-z'] are not among the sites "
        "['hospital-a', 'hospital-b', 'hospital-c']; name one of those (a site's name is the "
        "`site` of its manifest)"
    ]


# --------------------------------------------------------------------------- coordinator


@pytest.fixture(scope="module")
def held_out(sites_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Stage 0 of the tiny plan run to its commit, hospital-b held out.

    The training round is stood in (it records the nodes it was given and leaves the model
    as grown): selection, evaluation by the real sites, results and lineage are the real ones.
    """
    raw = _holdout_plan("hospital-b", rounds=1, validate_every=0)
    raw["stages"] = raw["stages"][:1]
    plan = validate_plan(raw)
    tmp = tmp_path_factory.mktemp("unseen")
    transport = InProcessTransport([sites_dir / s for s in SITES], tmp / "site-state")
    coordinator = Coordinator(plan, Registry(tmp / "registry"), transport, site_wait=0)
    trained: list[list[str]] = []

    def train_round(index: int, round_: int, model: Any, nodes: list[int]) -> dict[str, Any]:
        trained.append(sorted(coordinator.sites[n].site for n in nodes))
        return {"sites": trained[-1], "loss": 0.5, "num_examples": 1.0}

    coordinator._train_round = train_round  # type: ignore[method-assign]
    version = coordinator.run_stage(0)
    records = coordinator.registry.metrics(plan.name)
    evaluation = next(r for r in records if r.get("kind") == "evaluation")
    return {
        "coordinator": coordinator,
        "trained": trained,
        "version": version,
        "evaluation": evaluation,
    }


def test_the_holdout_site_is_never_selected_for_training(held_out: dict[str, Any]) -> None:
    assert held_out["trained"] == [["hospital-a", "hospital-c"]]
    coordinator: Coordinator = held_out["coordinator"]
    raw = _holdout_plan("hospital-b", min_sites=3)
    raw["stages"] = raw["stages"][:1]
    strict = Coordinator(
        validate_plan(raw), coordinator.registry, coordinator.transport, site_wait=0
    )
    with pytest.raises(StageError) as caught:
        strict.select_sites(0)
    message = str(caught.value)
    assert "needs 3 eligible site(s), found 2" in message
    assert f"hospital-b: {HELD_OUT}" in message


def test_the_holdout_site_is_scored_apart_and_never_pooled(held_out: dict[str, Any]) -> None:
    evaluation = held_out["evaluation"]
    route = "lesion-class@ct"
    assert set(evaluation["per_site"]) == {"hospital-a", "hospital-c"}
    assert set(evaluation["per_site_n"]) == {"hospital-a", "hospital-c"}
    unseen = evaluation["unseen"]
    assert unseen["sites"] == ["hospital-b"] and set(unseen["per_site"]) == {"hospital-b"}
    # in-federation: the case-weighted mean of a and c only, by hand
    values = {s: evaluation["per_site"][s][route] for s in ("hospital-a", "hospital-c")}
    cases = {s: evaluation["per_site_n"][s][route] for s in values}
    expected = sum(values[s] * cases[s] for s in values) / sum(cases.values())
    assert evaluation["pooled"][route] == pytest.approx(expected)
    # unseen: hospital-b's own metric and interval
    assert unseen["pooled"][route] == pytest.approx(unseen["per_site"]["hospital-b"][route])
    assert unseen["per_site_n"]["hospital-b"][route] > 0
    lo, hi = unseen["pooled_ci"][route]
    assert lo <= unseen["pooled"][route] <= hi
    assert evaluation["fairness"][route]["worst_site"] in {"hospital-a", "hospital-c"}


def test_results_json_carries_unseen_rows_like_r(held_out: dict[str, Any]) -> None:
    coordinator: Coordinator = held_out["coordinator"]
    evaluation = held_out["evaluation"]
    results = coordinator.registry.results(coordinator.plan.name)
    assert results["holdout_sites"] == ["hospital-b"]
    assert len(results["unseen"]) == len(results["R"]) == len(results["unseen_ci"]) == 1
    assert results["unseen"][0] == evaluation["unseen"]["pooled"]
    assert set(results["R_per_site"]) == {"hospital-a", "hospital-c"}
    assert set(results["unseen_per_site"]) == {"hospital-b"}
    records = coordinator.registry.metrics(coordinator.plan.name)
    record = [r for r in records if r.get("kind") == "evaluation"][-1]
    assert record["unseen"]["sites"] == ["hospital-b"]
    result = method_result("unicon", results, [], 1.0)
    rows = unseen_comparison(result)
    assert [r["task"] for r in rows] == ["lesion-class@ct"]
    assert rows[0]["drop"] == pytest.approx(
        evaluation["pooled"]["lesion-class@ct"] - evaluation["unseen"]["pooled"]["lesion-class@ct"]
    )


def test_lineage_metrics_record_worst_gap_and_unseen() -> None:
    evaluation = {
        "pooled": {"a@ct": 0.7},
        "fairness": {"a@ct": {"worst_site": "h-1", "worst": 0.6, "gap": 0.2}},
        "unseen": {"pooled": {"a@ct": 0.55, "b@ct": math.nan}},
    }
    assert evaluation_lineage_metrics(evaluation) == {
        "worst/a@ct": 0.6,
        "gap/a@ct": 0.2,
        "unseen/a@ct": 0.55,
    }
    assert evaluation_lineage_metrics({"pooled": {}}) == {}


# --------------------------------------------------------------------------- synthetic data


def test_the_shifted_site_lies_outside_every_training_range() -> None:
    shifted = shifted_profile(cases_per_site=10)
    assert shifted.name == SHIFTED_SITE and shifted.has_pet and shifted.cases == 10
    assert (shifted.ct_scale, shifted.ct_offset, shifted.ct_noise, shifted.blur) == (
        1.25,
        80.0,
        45.0,
        1.4,
    )
    for seed in range(5):
        for profile in site_profiles(6, seed=seed):
            for name, (lo, hi) in SCANNER_RANGES.items():
                assert lo <= getattr(profile, name) <= hi < getattr(shifted, name)


def test_make_data_shifted_site_adds_one_site_and_keeps_the_others(tmp_path: Path) -> None:
    args = ["simulate", "make-data", "--sites", "1", "--size", "8", "--cases", "6"]
    plain = runner.invoke(full_app(), [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    shifted = runner.invoke(full_app(), [*args, "--shifted-site", "--out", str(tmp_path / "s")])
    assert shifted.exit_code == 0, shifted.output
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["hospital-a", SHIFTED_SITE]
    truth = json.loads((tmp_path / "s" / SHIFTED_SITE / "truth.json").read_text())
    assert truth["profile"]["ct_offset"] == 80.0
    same = "hospital-a/manifest.yaml"
    assert (tmp_path / "plain" / same).read_text() == (tmp_path / "s" / same).read_text()


# --------------------------------------------------------------------------- simulate CLI


def test_an_unknown_holdout_site_is_refused_before_anything_runs(
    sites_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    result = runner.invoke(
        full_app(),
        ["simulate", "--sites", str(sites_dir), "--holdout-site", "hospital-z", "--out", str(out)],
    )
    assert result.exit_code == 2, result.output
    assert "hospital-z" in result.output and "hospital-c" in result.output
    assert not out.exists()
    generated = runner.invoke(full_app(), ["simulate", "--holdout-site", "nope", "--out", str(out)])
    assert generated.exit_code == 2 and "hospital-shifted" in generated.output
    assert not out.exists()


def test_a_holdout_that_leaves_a_stage_short_is_refused_and_keeps_the_old_report(
    sites_dir: Path, tmp_path: Path
) -> None:
    raw = tiny_plan()
    raw["stages"][3]["min_sites"] = 2
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(raw))
    out = tmp_path / "report"
    (out / "work").mkdir(parents=True)
    (out / "work" / "previous.txt").write_text("kept")
    args = ["simulate", "--plan", str(plan), "--sites", str(sites_dir), "--out", str(out)]
    result = runner.invoke(full_app(), [*args, "--holdout-site", "hospital-a"])
    assert result.exit_code == 2, result.output
    assert "stages[3]" in result.output and "min_sites" in result.output
    assert (out / "work" / "previous.txt").read_text() == "kept"
    assert not (out / "work" / "registry").exists()


class _FakeFederation:
    """Records the plan it got and writes a one-stage run with a held-out site."""

    plans: ClassVar[list[Any]] = []

    def __init__(self, plan: Any, registry: Registry, transport: Any, **_: Any) -> None:
        self.plan, self.registry = plan, registry
        _FakeFederation.plans.append(plan)

    def run(self) -> None:
        stage = self.plan.stages[0].name
        self.registry.save_results(
            self.plan.name,
            {
                "stages": [stage],
                "R": [{"lesion-class@ct": 0.75}],
                "R_ci": [{"lesion-class@ct": [0.65, 0.85]}],
                "R_per_site": {"hospital-a": {stage: {"lesion-class@ct": 0.75}}},
                "holdout_sites": ["hospital-c"],
                "unseen": [{"lesion-class@ct": 0.5}],
                "unseen_ci": [{"lesion-class@ct": [0.3, 0.7]}],
                "unseen_per_site": {"hospital-c": {stage: {"lesion-class@ct": 0.5}}},
                "bytes_up": {"hospital-a": 10},
                "epsilon": {},
            },
        )


def test_simulate_holdout_reports_federation_and_unseen_side_by_side(
    sites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.coordinator
    import simulations.inprocess

    monkeypatch.setattr(server.coordinator, "Coordinator", _FakeFederation)
    monkeypatch.setattr(simulations.inprocess, "InProcessTransport", lambda *a, **k: None)
    out = tmp_path / "report"
    args = ["simulate", "--quick", "--engine", "inprocess", "--sites", str(sites_dir)]
    result = runner.invoke(
        full_app(), [*args, "--holdout-site", "hospital-c", "--json", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    plan = _FakeFederation.plans[-1]
    assert plan.evaluation.holdout_sites == ("hospital-c",)
    # min_sites fitted to the two training sites, not the three folders
    assert max(s.min_sites for s in plan.stages) == 2
    payload = json.loads(result.stdout)
    assert payload["holdout_sites"] == ["hospital-c"] and payload["unseen"] == [[0.5]]
    stored = json.loads((out / "results.json").read_text())["methods"]["unicon"]
    assert stored["unseen"]["sites"] == ["hospital-c"]
    assert stored["unseen"]["R"] == [[0.5]] and stored["unseen"]["R_ci"] == [[[0.3, 0.7]]]
    report = (out / "report.md").read_text()
    assert "in-federation vs unseen hospital (hospital-c" in report
    assert (
        "| foundation | lesion-class@ct | 0.750 [0.650, 0.850] | 0.500 [0.300, 0.700] | +0.250 |"
        in (report)
    )
    assert "hospital-c is held out of all training" in report


def test_without_holdout_the_report_has_no_unseen_entry(tmp_path: Path) -> None:
    registry_like = {"stages": ["s"], "R": [{"a@ct": 0.5}], "R_per_site": {}}
    result = method_result("unicon", registry_like, [], 1.0)
    assert "unseen" not in result.to_json() and unseen_comparison(result) == []
    write_report(tmp_path, "p", {"unicon": result})
    assert "unseen" not in (tmp_path / "report.md").read_text()
    summary = summary_json(
        "p", {"unicon": result}, engine="inprocess", sites=[], versions=[], report=tmp_path
    )
    assert "unseen" not in summary and "holdout_sites" not in summary


def test_generated_data_with_the_shifted_holdout_adds_a_fifth_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulations.synthetic

    calls: list[dict[str, Any]] = []

    def fake_make_sites(out: Path, **kwargs: Any) -> list[Path]:
        calls.append(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(simulations.synthetic, "make_sites", fake_make_sites)
    result = runner.invoke(
        full_app(), ["simulate", "--holdout-site", SHIFTED_SITE, "--out", str(tmp_path / "r")]
    )
    assert isinstance(result.exception, RuntimeError)
    assert calls and calls[0]["shifted_site"] is True and calls[0]["sites"] == 4


def test_the_version_lineage_records_the_unseen_site(held_out: dict[str, Any]) -> None:
    coordinator: Coordinator = held_out["coordinator"]
    registry = coordinator.registry
    lineage = registry.manifest(held_out["version"]).lineage
    assert lineage.sites == ["hospital-a", "hospital-c"]
    route = "lesion-class@ct"
    results = registry.results(coordinator.plan.name)
    assert lineage.metrics[f"unseen/{route}"] == pytest.approx(results["unseen"][0][route])
    assert lineage.metrics[f"gap/{route}"] == pytest.approx(results["fairness"][0][route]["gap"])
    assert lineage.metrics[f"worst/{route}"] == pytest.approx(
        min(results["R_per_site"][s]["foundation"][route] for s in ("hospital-a", "hospital-c"))
    )
