"""The ``unicon`` console script: installed, helpful, and `plan check` reports problems."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unicon_cli.main import app, full_app

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


# --------------------------------------------------------------------------- site run TLS


@pytest.fixture
def wide_site_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The site CLI's console at full width (no wrapped command lines)."""
    import client.cli

    monkeypatch.setattr(client.cli.console, "width", 400)


def _site_run(sites_dir: Path, state: Path, *extra: str) -> list[str]:
    return [
        "site",
        "run",
        "--superlink",
        "127.0.0.1:9093",
        "--manifest",
        str(sites_dir / "hospital-a" / "manifest.yaml"),
        "--state-dir",
        str(state),
        "--dry-run",
        *extra,
    ]


def test_site_run_without_certificates_refuses(
    sites_dir: Path, tmp_path: Path, wide_site_console: None
) -> None:
    state = tmp_path / "state"
    result = runner.invoke(full_app(), _site_run(sites_dir, state))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "refusing to connect without TLS" in text
    assert "--root-certificates" in text and "--insecure" in text
    assert "flower-supernode" not in text  # nothing was started or printed to start
    assert not state.exists()  # refused before anything was created


def test_site_run_with_both_tls_and_insecure_refuses(
    sites_dir: Path, tmp_path: Path, wide_site_console: None
) -> None:
    args = _site_run(sites_dir, tmp_path / "s", "--insecure", "--root-certificates", "ca.crt")
    result = runner.invoke(full_app(), args)
    assert result.exit_code == 2
    assert "contradict" in result.output and not (tmp_path / "s").exists()


def test_site_run_insecure_is_explicit_and_loud(
    sites_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    wide_site_console: None,
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.cli"):
        result = runner.invoke(
            full_app(), _site_run(sites_dir, tmp_path / "s", "--insecure", "--max-message-mb", "64")
        )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "WARNING: --insecure: no TLS to 127.0.0.1:9093" in text
    assert "flower-supernode" in text and "--insecure" in text
    assert "max-message-mb=64.0" in text
    assert any(
        r.levelno == logging.WARNING and "WITHOUT TLS" in r.getMessage() for r in caplog.records
    )


def test_site_run_with_certificates_uses_tls(
    sites_dir: Path, tmp_path: Path, wide_site_console: None
) -> None:
    result = runner.invoke(
        app, _site_run(sites_dir, tmp_path / "s", "--root-certificates", str(tmp_path / "ca.crt"))
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "--root-certificates" in text and "--insecure" not in text
    assert "WARNING" not in text


def test_supernode_command_needs_exactly_one_transport_mode(tmp_path: Path) -> None:
    from client.cli import supernode_command

    common = {
        "superlink": "h:1",
        "manifest": tmp_path / "m.yaml",
        "state_dir": tmp_path,
        "policy": None,
        "auth_key": None,
        "port": 9094,
    }
    with pytest.raises(ValueError, match="exactly one"):
        supernode_command(root_certificates=None, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exactly one"):
        supernode_command(root_certificates=tmp_path, insecure=True, **common)  # type: ignore[arg-type]
    assert "--insecure" in supernode_command(root_certificates=None, insecure=True, **common)  # type: ignore[arg-type]
