"""The ``unicon`` console script: installed, helpful, and `plan check` reports problems."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from typer.testing import CliRunner

from unicon_model.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_console_script_help_lists_the_plan_commands() -> None:
    exe = shutil.which("unicon") or str(Path(ROOT, ".venv", "bin", "unicon"))
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "plan" in result.stdout


def test_plan_check_accepts_the_example_plan() -> None:
    result = runner.invoke(app, ["plan", "check", str(ROOT / "examples/plans/unicon.toml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
    assert "foundation" in result.output and "SecAgg+" in result.output


def test_plan_check_lists_every_problem_and_exits_1(tmp_path: Path) -> None:
    plan = tmp_path / "bad.toml"
    plan.write_text(
        'name = "bad"\n'
        "[[stages]]\n"
        'name = "s1"\n'
        "rounds = 0\n"
        'add_modalities = [{ name = "ct" }]\n'
        'add_tasks = [{ name = "seg", kind = "segmentation" }]\n'
    )
    result = runner.invoke(app, ["plan", "check", str(plan)])
    assert result.exit_code == 1
    assert "2 problem(s)" in result.output
    assert "stages[0].rounds" in result.output
    assert "labels" in result.output
