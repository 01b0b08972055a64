"""``unicon simulate`` over site folders: the report agrees with the registry it ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.registry import Registry
from simulations.report import continual_metrics, results_matrix
from unicon_model.cli import full_app

runner = CliRunner()


def test_simulate_quick_in_process_writes_a_consistent_report(
    sites_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    result = runner.invoke(
        full_app(),
        [
            "simulate",
            "--quick",
            "--engine",
            "inprocess",
            "--sites",
            str(sites_dir),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "summary" in result.output and "ACC" in result.output
    payload = json.loads((out / "results.json").read_text())
    unicon = payload["methods"]["unicon"]
    assert unicon["stages"] == ["foundation", "prognosis", "segmentation", "pet"]
    registry = Registry(out / "work" / "registry")
    assert registry.versions()[-1] == "v0004-pet"
    stored = registry.results(payload["plan"])
    columns, matrix = results_matrix(stored["stages"], stored["R"])
    assert unicon["tasks"] == columns
    acc, bwt, _ = continual_metrics(matrix)
    assert unicon["acc"] == pytest.approx(acc)
    assert unicon["bwt"] == pytest.approx(bwt)
    # frozen-backbone stages: earlier tasks' metrics cannot change (parameter isolation)
    assert unicon["forgetting"] == pytest.approx(0.0, abs=1e-12)
    # PET columns only at the PET sites (two of three)
    assert "lesion-seg@pet" in columns
    assert set(unicon["bytes_up"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for name in ("report.md", "R_heatmap.png", "rounds.png", "sites.png"):
        assert (out / name).exists()


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
