"""The run config: declared once in :class:`RunConfig`, equal to pyproject's, checked on read."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from server.launch import launch_run_config, write_run_config
from server.run_config import RunConfig, RunConfigError
from unicon_model import wire

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _pyproject_config() -> dict[str, object]:
    return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_exactly_the_keys_and_defaults_of_run_config() -> None:
    declared = _pyproject_config()
    defaults = RunConfig().to_flower()
    assert list(declared) == list(defaults) == list(RunConfig.flower_keys())
    assert {k: (type(v), v) for k, v in declared.items()} == {
        k: (type(v), v) for k, v in defaults.items()
    }
    assert defaults["site-wait"] == 120.0 and defaults["max-message-mb"] == 2048.0


def test_flowers_config_is_read_typed_and_written_back() -> None:
    values = {
        **_pyproject_config(),
        "plan": "/p/plan.toml",
        "registry": "/r",
        "stage": "pet",
        "site-wait": 30,
        "query-timeout": "45.5",  # numbers given as text are read, as float() always did
        "site-dirs": json.dumps(["/s/a", "/s/b"]),
    }
    config = RunConfig.from_flower(values, require=("plan", "registry"))
    assert config == RunConfig(
        plan="/p/plan.toml",
        registry="/r",
        stage="pet",
        site_wait=30.0,
        query_timeout=45.5,
        site_dirs=("/s/a", "/s/b"),
    )
    assert config.evaluate_timeout == 600.0 and config.state_root == ""
    written = config.to_flower()
    assert written["site-dirs"] == '["/s/a", "/s/b"]' and written["site-wait"] == 30.0
    assert RunConfig.from_flower(written) == config
    # absent keys take the defaults; an empty config is the defaults
    assert RunConfig.from_flower({}) == RunConfig()
    assert RunConfig().max_message_bytes == 2048 << 20
    assert RunConfig(max_message_mb=2).max_message_bytes == wire.limit_from_config(
        {"max-message-mb": 2}, source="x"
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"site-wait": "soon"},
            "run config 'site-wait' = 'soon' is not a number; set it with "
            "flwr run --run-config 'site-wait=120.0'",
        ),
        ({"query-timeout": True}, "run config 'query-timeout' = True is not a number"),
        (
            {"evaluate-timeout": -1.0},
            "run config 'evaluate-timeout' = -1.0: give a finite "
            "number >= 0; set it with flwr run --run-config 'evaluate-timeout=600.0'",
        ),
        ({"site-wait": "nan"}, "run config 'site-wait' = nan: give a finite number >= 0"),
        ({"max-message-mb": 0}, "run config 'max-message-mb' = 0.0: give a finite number > 0"),
        ({"site-dirs": "/s/a"}, "run config 'site-dirs' = '/s/a' is not a JSON list of folders"),
        ({"site-dirs": "[1]"}, "run config 'site-dirs' = '[1]' is not a JSON list of folders"),
        (
            {"registry": "/r"},
            "run config lacks 'plan' (Path of the plan file (TOML or JSON) "
            "the ServerApp runs.); set it with flwr run --run-config 'plan=\"...\"'",
        ),
        ({"plan": "/p", "registry": ""}, "run config lacks 'registry' (Registry directory.)"),
    ],
)
def test_a_bad_value_names_the_key_and_the_fix(values: dict[str, object], message: str) -> None:
    with pytest.raises(RunConfigError) as info:
        RunConfig.from_flower(values, require=("plan", "registry"))
    assert str(info.value).startswith(message)


def test_an_unknown_key_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert RunConfig.from_flower({"bogus": 1, "stage": "s"}) == RunConfig(stage="s")
    assert "run config key 'bogus' is not one of" in caplog.text


def test_help_is_declared_per_key() -> None:
    assert RunConfig.help("site-wait") == "Seconds to wait for eligible sites."
    assert RunConfig.help("evaluate-timeout") == (
        "Seconds to wait for evaluation replies after a stage."
    )
    with pytest.raises(KeyError, match="'site_wait' is not a run config key"):
        RunConfig.help("site_wait")


def test_the_launchers_run_config_reads_back_as_what_it_set(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    config = launch_run_config(plan, tmp_path / "reg", None, 5, 7.5)
    path = write_run_config(tmp_path, config)
    assert path == tmp_path / "run-config.toml"
    written = tomllib.loads(path.read_text())
    assert written == {
        **_pyproject_config(),
        "plan": str(plan.resolve()),
        "registry": str(tmp_path / "reg"),
        "site-wait": 5.0,
        "evaluate-timeout": 7.5,
    }
    assert RunConfig.from_flower(written, require=("plan", "registry")) == config
