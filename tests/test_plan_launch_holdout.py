"""``unicon plan launch --holdout-site NAME`` (issue 14, item 3, deployment side).

``flwr run`` is replaced by a fake that records the run config it was given: the plan the
ServerApp would load must hold the site(s) in ``[evaluation] holdout_sites``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import server.cli
from unicon_cli.main import full_app
from unicon_model.schema import load_plan

ROOT = Path(__file__).resolve().parents[1]
PLAN = ROOT / "examples/plans/unicon.toml"
runner = CliRunner()


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run configs given to the fake ``flwr run`` (nothing is launched, no status printed)."""
    configs: list[dict[str, Any]] = []

    def fake_run(command: list[str], *, flwr_home: Path) -> int:
        config = Path(command[command.index("--run-config") + 1])
        configs.append(tomllib.loads(config.read_text()))
        return 0

    monkeypatch.setattr(server.cli, "flwr_run", fake_run)
    monkeypatch.setattr(server.cli, "_print_status", lambda registry, name: None)
    return configs


def _launch(registry: Path, *extra: str, plan: Path = PLAN) -> Any:
    args = ["plan", "launch", str(plan), "--registry", str(registry), "--superlink", "h:1"]
    return runner.invoke(full_app(), [*args, *extra])


def test_holdout_site_reaches_the_plan_the_server_app_loads(
    tmp_path: Path, launched: list[dict[str, Any]]
) -> None:
    result = _launch(tmp_path / "reg", "--holdout-site", "hospital-b")
    assert result.exit_code == 0, result.output
    (config,) = launched
    run_plan = load_plan(config["plan"])
    assert run_plan.evaluation.holdout_sites == ("hospital-b",)
    assert Path(config["plan"]).parent.parent == (tmp_path / "reg").resolve()
    # everything else is the plan as written
    assert run_plan.model_copy(update={"evaluation": load_plan(PLAN).evaluation}) == load_plan(PLAN)


def test_holdout_site_replaces_the_plans_own_and_leaves_the_file_untouched(
    tmp_path: Path, launched: list[dict[str, Any]]
) -> None:
    plan = tmp_path / "held.toml"
    plan.write_text(PLAN.read_text() + '\n[evaluation]\nholdout_sites = ["hospital-e"]\n')
    original = plan.read_bytes()
    result = _launch(tmp_path / "reg", "--holdout-site", "hospital-b", plan=plan)
    assert result.exit_code == 0, result.output
    assert load_plan(launched[0]["plan"]).evaluation.holdout_sites == ("hospital-b",)
    assert "replaces the plan's holdout_sites ['hospital-e']" in result.stderr
    assert plan.read_bytes() == original


def test_without_the_option_the_plan_file_is_launched_as_is(
    tmp_path: Path, launched: list[dict[str, Any]]
) -> None:
    result = _launch(tmp_path / "reg")
    assert result.exit_code == 0, result.output
    assert launched[0]["plan"] == str(PLAN.resolve())


def test_an_invalid_or_repeated_holdout_site_is_refused_before_flwr_runs(
    tmp_path: Path, launched: list[dict[str, Any]]
) -> None:
    bad = _launch(tmp_path / "reg", "--holdout-site", "../etc")
    assert bad.exit_code == 2
    assert "--holdout-site ../etc" in bad.stderr and "holdout_sites" in bad.stderr
    twice = _launch(tmp_path / "reg", "--holdout-site", "h1", "--holdout-site", "h1")
    assert twice.exit_code == 2 and "h1" in twice.stderr
    assert launched == []  # nothing launched
