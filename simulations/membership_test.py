"""The membership-inference attack and the record of what left each site."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from typer.testing import CliRunner

from client.data import CaseDataset, label_key
from client.manifest import load_manifest
from client.site_folder import manifest_in
from server.registry import CompletedStage, Registry, RunProgress
from simulations import membership
from simulations.membership import (
    CaseLosses,
    attack_auc,
    attack_interval,
    case_losses,
    data_left_sites,
    privacy_report,
    survival_losses,
    trained_routes,
)
from simulations.report import method_result, write_report
from simulations.synthetic import make_sites
from unicon_cli.main import full_app
from unicon_model.checkpoint import Lineage
from unicon_model.metrics.uncertainty import bootstrap_counts, bootstrap_seed
from unicon_model.model import UniconModel
from unicon_model.schema import Plan, TaskSpec, validate_plan

CLS = TaskSpec(name="cls", kind="classification", classes=("a", "b"))
CPU = torch.device("cpu")


def _plan(**first: Any) -> Plan:
    """Three stages: plain CT classification, secure survival, a PET stage, an SSL task."""
    return validate_plan(
        {
            "name": "tiny-mia",
            "model": {"spatial_dims": 3, "widths": [2, 4], "adapter_rank": 1, "head_hidden": 4},
            "data": {"patch_size": [8, 8, 8]},
            "stages": [
                {
                    "name": "foundation",
                    "add_modalities": [{"name": "ct"}],
                    "add_tasks": [
                        {
                            "name": "lesion-class",
                            "kind": "classification",
                            "classes": ["benign", "malignant"],
                        },
                        {"name": "recon", "kind": "reconstruction"},
                    ],
                    "train": ["backbone", "modality/ct", "task/lesion-class", "task/recon"],
                    **first,
                },
                {
                    "name": "prognosis",
                    "add_tasks": [{"name": "survival", "kind": "survival"}],
                    "secure_aggregation": True,
                    "min_sites": 2,
                    "secagg": {"num_shares": 2},
                },
                {
                    "name": "pet",
                    "add_modalities": [{"name": "pet", "inputs": ["ct", "pet"]}],
                    "objectives": ["lesion-class"],
                },
            ],
        }
    )


# ---------------------------------------------------------------------- the statistic
def test_attack_auc_equals_sklearn_roc_auc_with_ties() -> None:
    rng = np.random.default_rng(0)
    member = rng.integers(0, 6, 30).astype(float)  # many ties
    nonmember = rng.integers(1, 8, 17).astype(float)
    is_member = np.r_[np.ones(30), np.zeros(17)]
    expected = roc_auc_score(is_member, -np.r_[member, nonmember])
    assert attack_auc(member, nonmember) == pytest.approx(expected, abs=1e-12)
    assert attack_auc([0.1, 0.2], [0.3, 0.4]) == 1.0  # lower loss => member
    assert attack_auc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert math.isnan(attack_auc([], [0.1]))


def test_attack_interval_is_the_stratified_bootstrap_of_sklearn_auc() -> None:
    rng = np.random.default_rng(1)
    strata = [
        CaseLosses(rng.normal(0.0, 1.0, 9), rng.normal(0.5, 1.0, 5)),
        CaseLosses(rng.normal(0.2, 1.0, 7), rng.normal(0.4, 1.0, 4)),
    ]
    interval = attack_interval(strata, name="r", replicates=50)
    # the same resamples, one replicate at a time through sklearn
    draws = {
        (i, group): bootstrap_counts(
            len(values), replicates=50, seed=bootstrap_seed(f"r/{i}/{group}")
        )
        for i, s in enumerate(strata)
        for group, values in (("member", s.member), ("nonmember", s.nonmember))
    }
    replicates = []
    for b in range(50):
        member = np.concatenate(
            [np.repeat(s.member, draws[i, "member"][b]) for i, s in enumerate(strata)]
        )
        other = np.concatenate(
            [np.repeat(s.nonmember, draws[i, "nonmember"][b]) for i, s in enumerate(strata)]
        )
        labels = np.r_[np.ones(member.size), np.zeros(other.size)]
        replicates.append(roc_auc_score(labels, -np.r_[member, other]))
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    assert (interval.lo, interval.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert interval.se == pytest.approx(np.std(replicates, ddof=1), abs=1e-12)
    # seeded: the same losses give the same interval on every run
    assert attack_interval(strata, name="r", replicates=50) == interval


def test_non_finite_losses_are_refused_naming_the_group() -> None:
    with pytest.raises(ValueError, match="non-member losses hold NaN"):
        attack_auc([0.1], [float("nan")])
    with pytest.raises(ValueError, match="member losses hold NaN"):
        attack_interval([CaseLosses(np.array([np.inf]), np.array([0.1]))], name="r")


# ---------------------------------------------------------------------- the attack on models
def _cases(rng: torch.Generator, n: int) -> CaseDataset:
    samples = [
        {
            "image": torch.randn(1, 8, 8, generator=rng),
            label_key("cls", "has"): torch.tensor(True),
            label_key("cls", "label"): torch.randint(0, 2, (), generator=rng),
        }
        for _ in range(n)
    ]
    return CaseDataset(samples, modality="ct", case_ids=[f"c{i}" for i in range(n)])


class _Linear(nn.Module):
    """A tiny classifier with the model's call signature (logits from the flattened image)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():  # seeded weights, the global generator untouched
            torch.manual_seed(3)
            self.linear = nn.Linear(64, 2)

    def forward(
        self, x: Tensor, *, modality: str, task: str, clinical: Tensor | None = None
    ) -> Tensor:
        return self.linear(x.flatten(1))


def test_a_memorising_model_is_exposed_and_an_untrained_one_is_not() -> None:
    rng = torch.Generator().manual_seed(0)
    members, nonmembers = _cases(rng, 8), _cases(rng, 24)  # random labels: only memory helps
    model = _Linear()
    untrained = CaseLosses(
        case_losses(model, members, CLS, device=CPU),
        case_losses(model, nonmembers, CLS, device=CPU),
    )
    batch = {k: torch.stack([s[k] for s in members.samples]) for k in members.samples[0]}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    for _ in range(30):  # overfit the eight members
        optimizer.zero_grad()
        logits = model(batch["image"], modality="ct", task="cls")
        nn.functional.cross_entropy(logits, batch[label_key("cls", "label")]).backward()
        optimizer.step()
    trained = CaseLosses(
        case_losses(model, members, CLS, device=CPU),
        case_losses(model, nonmembers, CLS, device=CPU),
    )
    assert trained.member.shape == (8,) and trained.nonmember.shape == (24,)
    memorised = attack_auc(trained.member, trained.nonmember)
    assert memorised > 0.8
    assert attack_interval([trained], name="m").lo > 0.6
    chance = attack_auc(untrained.member, untrained.nonmember)
    assert abs(chance - 0.5) < 0.2
    interval = attack_interval([untrained], name="u")
    assert interval.lo <= 0.5 <= interval.hi


class _RiskOfImage(nn.Module):
    """A survival "model" whose risk is the image's first voxel."""

    def forward(
        self, x: Tensor, *, modality: str, task: str, clinical: Tensor | None = None
    ) -> Tensor:
        return x.flatten(1)[:, 0]


def _survival_cases(risks: list[float], times: list[float], events: list[float]) -> CaseDataset:
    samples = [
        {
            "image": torch.full((1, 2, 2), r),
            label_key("surv", "has"): torch.tensor(True),
            label_key("surv", "time"): torch.tensor(t),
            label_key("surv", "event"): torch.tensor(e),
        }
        for r, t, e in zip(risks, times, events, strict=True)
    ]
    return CaseDataset(samples, modality="ct", case_ids=[str(i) for i in range(len(samples))])


def test_survival_proxy_scores_both_groups_in_one_risk_set_and_drops_censored() -> None:
    task = TaskSpec(name="surv", kind="survival")
    members = _survival_cases([0.5, -0.2, 1.0], [2.0, 5.0, 1.0], [1.0, 0.0, 1.0])
    nonmembers = _survival_cases([0.1, 0.3], [3.0, 4.0], [1.0, 1.0])
    losses = survival_losses(_RiskOfImage(), members, nonmembers, task, device=CPU)
    risk = np.array([0.5, -0.2, 1.0, 0.1, 0.3])
    time = np.array([2.0, 5.0, 1.0, 3.0, 4.0])

    def term(i: int) -> float:  # no ties: -(r_i - log sum_{t_j >= t_i} exp r_j)
        return float(-(risk[i] - np.log(np.exp(risk[time >= time[i]]).sum())))

    assert losses.member == pytest.approx([term(0), term(2)])  # the censored case is out
    assert losses.nonmember == pytest.approx([term(3), term(4)])
    with pytest.raises(ValueError, match="use survival_losses"):
        case_losses(_RiskOfImage(), members, task, device=CPU)


# ---------------------------------------------------------------------- routes and sites
def test_trained_routes_are_objectives_on_stage_modalities_without_reconstruction() -> None:
    assert trained_routes(_plan()) == {
        "lesion-class@ct": [0],
        "survival@ct": [1],
        "lesion-class@pet": [2],
    }


def _rounds() -> list[dict[str, Any]]:
    return [
        {"kind": "round", "stage": "foundation", "round": 1, "sites": ["h-a", "h-b"]},
        # h-c's update was rejected: it still left the site
        {
            "kind": "round",
            "stage": "foundation",
            "round": 2,
            "sites": ["h-a"],
            "rejected": {"h-c": "norm"},
            "failed": {"h-b": "timeout"},
        },
        # the same round again after a coordinator restart: counted once
        {"kind": "round", "stage": "foundation", "round": 2, "sites": ["h-a"]},
        {
            "kind": "round",
            "stage": "prognosis",
            "round": 1,
            "sites": ["h-a", "h-b"],
            "secure": True,
        },
        {"kind": "evaluation", "stage": "foundation", "pooled": {}},
    ]


def test_data_left_sites_names_components_form_and_rounds_from_a_registry(tmp_path: Path) -> None:
    plan = _plan()
    registry = Registry(tmp_path / "registry")
    for record in _rounds():
        registry.append_metrics(plan.name, record)
    rounds = [r for r in registry.metrics(plan.name) if r.get("kind") == "round"]
    left = data_left_sites(plan, rounds, bytes_up={"h-a": 10, "h-d": 0}, bytes_down={"h-a": 30})
    assert sorted(left) == ["h-a", "h-b", "h-c", "h-d"]
    a = left["h-a"]
    assert (a["bytes_up"], a["bytes_down"], a["rounds"]) == (10, 30, 3)
    assert a["stages"] == {
        "foundation": {
            "components": ["backbone", "modality/ct", "task/lesion-class", "task/recon"],
            "form": "update",
            "rounds": 2,
        },
        "prognosis": {"components": ["task/survival"], "form": "masked update", "rounds": 1},
    }
    assert left["h-b"]["stages"]["foundation"]["rounds"] == 1  # failed round 2 sent nothing
    assert left["h-c"]["stages"] == {
        "foundation": {
            "components": ["backbone", "modality/ct", "task/lesion-class", "task/recon"],
            "form": "update",
            "rounds": 1,
        }
    }
    assert left["h-d"] == {"bytes_up": 0, "bytes_down": 0, "rounds": 0, "stages": {}}


@pytest.fixture(scope="module")
def sites_and_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("mia-sites")
    paths = make_sites(out, sites=2, seed=5, size=8, cases_per_site=10, pet_sites=1)
    manifests = [load_manifest(manifest_in(p.parent)) for p in paths]
    return {m.site: m for m in manifests} | {"_folders": [p.parent for p in paths]}


def test_privacy_report_attacks_the_last_version_of_member_sites_only(
    tmp_path: Path, sites_and_folders: dict[str, Any]
) -> None:
    tiny_sites = {k: v for k, v in sites_and_folders.items() if k != "_folders"}
    plan = _plan(privacy={"mode": "local", "target_epsilon": 8.0})
    registry = Registry(tmp_path / "registry")
    model = UniconModel(plan.model)
    for stage in plan.stages:
        model.grow(stage)
    version = registry.commit(model, lineage=Lineage(plan=plan.name, stage="pet"))
    registry.save_progress(
        RunProgress(plan=plan.name, completed=[CompletedStage(stage="pet", version=version)])
    )
    first, second = sorted(tiny_sites)
    for record in (
        {"kind": "round", "stage": "foundation", "round": 1, "sites": [first]},
        {"kind": "round", "stage": "prognosis", "round": 1, "sites": [first, second]},
    ):
        registry.append_metrics(plan.name, record)
    report = privacy_report(
        plan,
        registry,
        tiny_sites,
        epsilon={first: 7.5, second: 0.0},
        bytes_up={first: 100, second: 50},
        bytes_down={first: 200, second: 200},
    )
    assert report["max_epsilon"] == 7.5
    assert report["dp"] == {"foundation": {"mode": "local", "target_epsilon": 8.0}}
    assert report["mia_version"] == version
    classification = report["mia"]["lesion-class@ct"]
    assert classification["epsilon_target"] == 8.0
    assert report["mia"]["survival@ct"]["epsilon_target"] is None  # no DP there: ε = ∞
    # only the site that sent an update for the route is attacked; its members are its
    # labelled train cases, its non-members its test cases
    assert set(classification["per_site"]) == {first}
    assert "sent no update" in classification["skipped"][second]
    manifest = tiny_sites[first]
    members = [c for c in manifest.cases if c.split == "train" and "lesion-class" in c.labels]
    tests = [c for c in manifest.cases if c.split == "test" and "lesion-class" in c.labels]
    site = classification["per_site"][first]
    assert (site["members"], site["nonmembers"]) == (len(members), len(tests))
    assert 0.0 <= classification["mia_auc"] <= 1.0
    lo, hi = classification["mia_auc_ci"]
    assert lo <= hi
    assert report["data_left_sites"][second]["stages"]["prognosis"]["form"] == "masked update"
    # --no-mia: no attack, the record of what left each site stays
    quiet = privacy_report(
        plan, registry, tiny_sites, epsilon={}, bytes_up={first: 100}, bytes_down={}, attack=False
    )
    assert quiet["mia"] is None and quiet["data_left_sites"][first]["bytes_up"] == 100


def test_report_section_and_results_json_carry_the_privacy_entry(tmp_path: Path) -> None:
    registry_results = {
        "stages": ["foundation"],
        "R": [{"lesion-class@ct": 0.7}],
        "R_per_site": {"h-a": {"foundation": {"lesion-class@ct": 0.7}}},
        "bytes_up": {"h-a": 1234},
        "bytes_down": {"h-a": 5678},
        "epsilon": {"h-a": 7.9},
    }
    result = method_result("unicon", registry_results, [], wall_s=1.0)
    left = data_left_sites(_plan(), _rounds(), bytes_up={"h-a": 1234}, bytes_down={"h-a": 5678})
    privacy = {
        "max_epsilon": 7.9,
        "dp": {"foundation": {"mode": "local", "target_epsilon": 8.0}},
        "data_left_sites": {"h-a": left["h-a"]},
        "mia": {
            "lesion-class@ct": {
                "epsilon_target": 8.0,
                "mia_auc": 0.52,
                "mia_auc_ci": [0.41, 0.63],
                "members": 20,
                "nonmembers": 8,
                "per_site": {"h-a": {"auc": 0.52, "ci": [0.41, 0.63]}},
                "skipped": {},
            },
            "survival@ct": {"epsilon_target": None, "mia_auc": None, "per_site": {}},
        },
    }
    write_report(tmp_path, "plan-x", {"unicon": result}, privacy=privacy)
    assert json.loads((tmp_path / "results.json").read_text())["privacy"] == privacy
    text = (tmp_path / "report.md").read_text()
    section = text[text.index("## Privacy in practice") :]
    assert "| lesion-class@ct | 8 | 0.520 [0.410, 0.630] | 20 / 8 | h-a 0.520 |" in section
    assert "| survival@ct | ∞ | – | 0 / 0 | – |" in section
    assert "DP stages: foundation (ε 8)" in section
    assert (
        "| h-a | 1,234 | 5,678 | 3 | foundation: backbone, modality/ct, task/lesion-class, "
        "task/recon (update, 2 round(s)); prognosis: task/survival (masked update, 1 round(s)) |"
    ) in section
    # without the attack (--no-mia) the section says so and keeps the data that left
    write_report(tmp_path, "plan-x", {"unicon": result}, privacy={**privacy, "mia": None})
    text = (tmp_path / "report.md").read_text()
    assert "not run (`--no-mia`)" in text and "| h-a | 1,234 |" in text
    failed = {**privacy, "mia": None, "mia_error": "out of memory"}
    write_report(tmp_path, "plan-x", {"unicon": result}, privacy=failed)
    assert "attack failed: out of memory" in (tmp_path / "report.md").read_text()


def test_simulate_offers_no_mia() -> None:
    result = CliRunner().invoke(full_app(), ["simulate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--no-mia" in result.output


def test_a_failing_attack_keeps_the_rest_of_the_privacy_entry(
    tmp_path: Path, sites_and_folders: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan()
    registry = Registry(tmp_path / "registry")
    version = registry.commit(UniconModel(plan.model), lineage=Lineage(plan=plan.name))
    registry.save_progress(
        RunProgress(plan=plan.name, completed=[CompletedStage(stage="pet", version=version)])
    )
    registry.append_metrics(plan.name, _rounds()[0])

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(membership, "membership_attack", broken)
    report = membership.simulation_privacy(
        plan,
        registry,
        sites_and_folders["_folders"],
        epsilon={"h-a": 1.0},
        bytes_up={"h-a": 5},
        bytes_down={},
    )
    assert report["mia"] is None and report["mia_error"] == "out of memory"
    assert report["data_left_sites"]["h-a"]["bytes_up"] == 5
    assert report["data_left_sites"]["h-b"]["stages"]["foundation"]["rounds"] == 1
