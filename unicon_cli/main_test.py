"""The root ``unicon`` application: its command tree, and the layering under it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
from typer.main import get_command
from typer.testing import CliRunner

import client.cli
import client.predict
import server.certs_cli
import server.cli
import server.registry_cli
import simulations.cli
import unicon_model.cli
from unicon_cli.main import SUBCOMMANDS, app, build_app, full_app

ROOT = Path(__file__).resolve().parents[1]


def _group(command: click.Command) -> click.Group:
    assert isinstance(command, click.Group)
    return command


def test_the_root_lists_every_command_in_order() -> None:
    root = _group(get_command(app))
    assert list(root.commands) == [
        "status",
        "predict",
        "plan",
        "site",
        "server",
        "model",
        "simulate",
        "certs",
    ]
    assert list(_group(root.commands["plan"]).commands) == ["check", "launch"]
    assert root.commands["plan"].help == unicon_model.cli.PLAN_HELP
    assert full_app() is app


def test_each_sub_application_is_its_package_s_own() -> None:
    modules = {
        "site": client.cli,
        "server": server.cli,
        "model": server.registry_cli,
        "simulate": simulations.cli,
        "certs": server.certs_cli,
    }
    assert set(SUBCOMMANDS) == set(modules)
    for name, module in modules.items():
        assert SUBCOMMANDS[name].app is module.app
        assert SUBCOMMANDS[name].module == module.__name__
    root = _group(get_command(app))
    assert root.commands["site"].help == "Hospital site: check a manifest, audit, run the daemon."
    assert root.commands["status"].callback is not None
    assert root.commands["status"].callback.__module__ == "server.cli"
    assert root.commands["predict"].callback is not None
    assert root.commands["predict"].callback.__module__ == "client.predict"


def test_building_the_root_changes_no_package_s_app() -> None:
    before = list(_group(get_command(unicon_model.cli.app)).commands)
    build_app()
    build_app()
    model_plan = _group(_group(get_command(unicon_model.cli.app)).commands["plan"])
    assert list(_group(get_command(unicon_model.cli.app)).commands) == before == ["plan"]
    assert list(model_plan.commands) == ["check"]  # `launch` is the root's, not the model's
    names = {c.name for c in server.cli.app.registered_commands}
    assert "start" in names and not names & {"launch", "status"}


def test_the_model_cli_imports_no_higher_package() -> None:
    code = (
        "import sys, unicon_model.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} "
        "& {'client', 'server', 'simulations', 'unicon_cli', 'flwr'}))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert completed.stdout.strip() == "[]"


def test_python_m_unicon_cli_is_the_console_script() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "unicon_cli", "plan", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "check" in completed.stdout and "launch" in completed.stdout


def test_plan_check_through_the_root() -> None:
    result = CliRunner().invoke(
        app, ["plan", "check", "--json", str(ROOT / "examples/plans/unicon.toml")]
    )
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.stdout
