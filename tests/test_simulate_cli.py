"""``unicon simulate`` over site folders: the report agrees with the registry it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.data import build_dataset
from client.manifest import load_manifest
from client.site_folder import manifest_in
from server.registry import Registry
from simulations.cli import DEFAULT_PLAN, plan_for_run
from simulations.report import continual_metrics, results_matrix
from simulations.synthetic import make_sites
from unicon_cli.main import full_app
from unicon_model.schema import validate_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def quick_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three hospitals (two with PET) of 16³ volumes, ~40 cases each: enough to learn."""
    out = tmp_path_factory.mktemp("quick-sites")
    make_sites(out, sites=3, seed=7, size=16, cases_per_site=40, pet_sites=2)
    return out


@pytest.mark.slow
def test_quick_scenario_isolation_keeps_old_tasks_while_naive_fine_tuning_forgets(
    quick_sites: Path, tmp_path: Path
) -> None:
    # Execute: the quick UNICON scenario and the naive baseline on the same sites
    out = tmp_path / "report"
    result = runner.invoke(
        full_app(),
        [
            "simulate",
            "--quick",
            "--engine",
            "inprocess",
            "--compare",
            "naive",
            "--sites",
            str(quick_sites),
            "--out",
            str(out),
        ],
    )
    # Assert: the summary, the methods table and every report file
    assert result.exit_code == 0, result.output
    assert "summary" in result.output and "ACC" in result.output
    assert "methods: final test metric per task" in result.output
    for name in ("report.md", "results.json", "R_heatmap.png", "rounds.png", "sites.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "methods.png").stat().st_size > 0
    payload = json.loads((out / "results.json").read_text())
    unicon, naive = payload["methods"]["unicon"], payload["methods"]["naive"]
    # the report agrees with the registry the run wrote
    assert unicon["stages"] == ["foundation", "classification", "prognosis", "segmentation", "pet"]
    registry = Registry(out / "work" / "registry")
    assert registry.versions()[-1] == "v0005-pet"
    stored = registry.results(payload["plan"])
    columns, matrix = results_matrix(stored["stages"], stored["R"])
    assert unicon["tasks"] == columns
    acc, bwt, _ = continual_metrics(matrix)
    assert unicon["acc"] == pytest.approx(acc)
    assert unicon["bwt"] == pytest.approx(bwt)
    # the self-supervised foundation enters no R column; the first task was learned
    # (above the majority class of the test cases) by the stage after it
    assert not any(column.startswith("masked-ct") for column in columns)
    first = columns.index("lesion-class@ct")
    assert unicon["R"][0][first] is None
    assert unicon["R"][1][first] >= 0.6
    # parameter isolation: no earlier task's metric moves (BWT >= -0.01; in fact exactly 0)
    assert unicon["bwt"] >= -0.01
    assert unicon["forgetting"] == pytest.approx(0.0, abs=1e-12)
    # naive fine-tuning of the shared backbone moves the first task's outputs; isolation
    # keeps them bit for bit (whether the metric then drops depends on how well the quick
    # scenario learned the task: the outputs are what forgetting is made of)
    assert naive["R"][1][first] == pytest.approx(unicon["R"][1][first])  # same first stages
    images = _ct_test_images(quick_sites)
    ours = _first_task_logits(registry, images)
    theirs = _first_task_logits(Registry(out / "work" / "baselines" / "naive" / "registry"), images)
    assert torch.equal(ours[0], ours[-1])
    assert (theirs[0] - theirs[-1]).abs().max() > 1e-3
    assert payload["comparisons"]["bwt_unicon_minus_naive"] == pytest.approx(
        unicon["bwt"] - naive["bwt"]
    )
    # PET columns only at the PET sites (two of three); nothing leaves a site unmeasured
    assert "lesion-seg@pet" in columns
    assert set(unicon["bytes_up"]) == {"hospital-a", "hospital-b", "hospital-c"}
    assert set(unicon["R_per_site"]) == {"hospital-a", "hospital-b", "hospital-c"}


def _ct_test_images(sites: Path) -> torch.Tensor:
    """The CT test cases of every quick site, preprocessed as the sites do (16³)."""
    plan = validate_plan(plan_for_run(DEFAULT_PLAN, quick=True, dp=None, secure_sites=3))
    ct = plan.modalities_until(0)["ct"]
    images = []
    for folder in sorted(p for p in sites.iterdir() if p.is_dir()):
        data = build_dataset(
            load_manifest(manifest_in(folder)),
            split="test",
            modality=ct,
            tasks=plan.tasks_until(0),
            data=plan.data,
        )
        images += [s["image"] for s in data.samples]
    return torch.stack(images)


def _first_task_logits(registry: Registry, images: torch.Tensor) -> list[torch.Tensor]:
    """lesion-class@ct logits of the version that learned it and of the last one."""
    logits = []
    for version in (registry.versions()[1], registry.versions()[-1]):
        model, _ = registry.load(version)
        model.eval()
        with torch.no_grad():
            logits.append(model(images, modality="ct", task="lesion-class"))
    return logits


def test_an_unknown_baseline_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = runner.invoke(
        full_app(), ["simulate", "--compare", "naive,joint,fedavg", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2
    assert "joint" in result.output and "fedavg" in result.output
    assert not (tmp_path / "r").exists()


def test_make_data_writes_site_folders(tmp_path: Path) -> None:
    result = runner.invoke(
        full_app(),
        [
            "simulate",
            "make-data",
            "--out",
            str(tmp_path),
            "--sites",
            "2",
            "--size",
            "16",
            "--cases",
            "6",
            "--pet-sites",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital-a", "hospital-b"]
    assert (tmp_path / "hospital-a" / "pet").is_dir() and not (
        tmp_path / "hospital-b" / "pet"
    ).exists()


def test_flower_logging_follows_the_unicon_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("UNICON_LOG_LEVEL", "ERROR")
    runner.invoke(full_app(), ["simulate", "--compare", "bogus"])
    assert logging.getLogger("flwr").level == logging.ERROR
    monkeypatch.setenv("UNICON_LOG_LEVEL", "nonsense")
    runner.invoke(full_app(), ["simulate", "--compare", "bogus"])
    assert logging.getLogger("flwr").level == logging.WARNING
