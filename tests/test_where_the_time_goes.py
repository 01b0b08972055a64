"""The round breakdown plot, the Flower backend settings and the --sites-count refusal."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations import flower_run
from simulations.bench import steady_state
from simulations.flower_scale import per_site_mib, process_tree, tree_memory_mib
from simulations.report import MethodResult, _breakdown_plot, round_breakdown
from unicon_cli.main import full_app


def _round(stage: str, n: int, wall: float, wait: float, sites: dict) -> dict:
    coordinator = {"request_s": 0.1, "train_wait_s": wait, "checkpoint_s": wall - wait - 0.1}
    return {
        "stage": stage,
        "round": n,
        "wall_s": wall,
        "timing": {"coordinator": coordinator, "sites": sites},
    }


SEQUENTIAL = {"a": {"train_s": 1.0, "eval_s": 0.5}, "b": {"train_s": 1.5, "persist_s": 0.5}}


def _plain(output: str) -> str:
    """CLI output without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_the_breakdown_splits_the_wait_into_site_phases_and_adds_up_to_the_wall() -> None:
    rounds = [_round("s1", 1, 5.0, 4.0, SEQUENTIAL), _round("s1", 2, 5.0, 4.0, SEQUENTIAL)]
    (row,) = round_breakdown(rounds).values()
    assert row["site train"] == pytest.approx(2.5)
    assert row["messaging"] == pytest.approx(0.5)  # wait 4.0 - 3.5 served by the sites
    assert sum(row.values()) == pytest.approx(5.0)
    # sites in parallel (their sum exceeds the wait): shares of the wait, still the wall
    (row,) = round_breakdown([_round("s1", 1, 3.0, 1.75, SEQUENTIAL)]).values()
    assert sum(row.values()) == pytest.approx(3.0) and row["messaging"] == 0.0
    assert round_breakdown([{"stage": "old", "wall_s": 1.0}]) == {}  # no timing: skipped


def test_the_breakdown_plot_is_written(tmp_path: Path) -> None:
    result = MethodResult(
        name="unicon",
        stages=["s1"],
        tasks=[],
        R=[],
        R_per_site={},
        acc=0.0,
        bwt=0.0,
        forgetting=0.0,
        bytes_up={},
        bytes_down={},
        epsilon={},
        wall_s=1.0,
        rounds=[_round("s1", 1, 5.0, 4.0, SEQUENTIAL)],
    )
    _breakdown_plot(result, tmp_path / "rounds_breakdown.png")
    assert (tmp_path / "rounds_breakdown.png").stat().st_size > 1000


def test_steady_state_leaves_out_round_one_and_divides_by_the_useful_work() -> None:
    rounds = [_round("s1", 1, 50.0, 4.0, SEQUENTIAL), _round("s1", 2, 5.0, 4.0, SEQUENTIAL)]
    assert steady_state(rounds, workers=1)["steady_overhead"] == pytest.approx(5.0 / 3.0)
    assert steady_state(rounds, workers=None)["steady_overhead"] == pytest.approx(5.0 / 1.5)
    assert steady_state(rounds, workers=2)["steady_overhead"] == pytest.approx(5.0 / 1.5)
    assert steady_state(rounds[:1], workers=1)["steady_overhead"] != 0.0  # NaN: no round 2


def test_backend_settings_write_the_federation_config_and_refuse_bad_values() -> None:
    settings = flower_run.BackendSettings(cpus_per_site=2, gpus_per_site=0.25, runtime_cpus=8)
    assert settings.actors == 4
    assert settings.federation_config(100) == (
        "num-supernodes=100 client-resources-num-cpus=2 client-resources-num-gpus=0.25 "
        "init-args-num-cpus=8"
    )
    cluster = flower_run.BackendSettings(runtime_cpus=None)
    assert cluster.actors is None and "init-args" not in cluster.federation_config(3)
    with pytest.raises(ValueError, match=r"cpus_per_site must be >= 1.*gpus_per_site"):
        flower_run.BackendSettings(cpus_per_site=0, gpus_per_site=2.0)


def test_a_site_count_beyond_memory_is_refused_with_an_estimate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flower_run, "available_memory_mib", lambda: 4096.0)
    out = tmp_path / "report"
    result = CliRunner().invoke(
        full_app(), ["simulate", "--quick", "--sites-count", "1000", "--out", str(out)]
    )
    assert result.exit_code == 2
    text = _plain(result.output)
    assert "--sites-count" in text and "1000 sites need about" in text
    assert "4,096 MiB available" in text and "at most about" in text
    assert not out.exists()  # refused before anything was written
    assert flower_run.memory_problem(100, available_mib=24_000.0) == ""


def test_sites_count_with_site_folders_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        full_app(), ["simulate", "--sites", str(tmp_path), "--sites-count", "7"]
    )
    assert result.exit_code == 2
    assert "drop one of the two options" in _plain(result.output)


def test_the_process_tree_memory_is_read_from_proc() -> None:
    import os

    assert os.getpid() in process_tree(os.getpid())
    rss, pss = tree_memory_mib(os.getpid())
    assert rss > 10 and 0 < pss <= rss * 1.01
    assert per_site_mib([(10, 1000.0), (50, 1040.0), (100, 1090.0)]) == pytest.approx(1.0, 0.05)
