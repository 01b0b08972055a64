"""Issue 14, item 6: ``unicon model gate``, the deployment check before ``model export``.

The registry is the quick scenario's, built by hand (tests/test_cli_json.py), with the
fairness and unseen-site figures a run with ``--holdout-site`` records; the thresholds are
set against those known values, so every pass and failure is computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from server.registry import Registry
from tests.test_cli_json import PLAN, assert_fits_80, build_quick_registry
from unicon_cli.main import full_app

runner = CliRunner()

# v0004-pet's lineage (build_quick_registry): lesion-class@ct 0.61, survival@ct 0.66,
# lesion-seg@ct 0.71, lesion-seg@pet 0.76; fairness and unseen come from results.json below
GAPS = {"lesion-class@ct": 0.04, "survival@ct": 0.12, "lesion-seg@ct": 0.30, "lesion-seg@pet": 0.2}
UNSEEN = {"lesion-class@ct": 0.55, "survival@ct": 0.58, "lesion-seg@ct": 0.40}  # no PET there


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import server.registry_cli

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(server.registry_cli.console, "width", 80)
    root = build_quick_registry(tmp_path / "registry")
    stages = ["foundation", "prognosis", "segmentation", "pet"]
    Registry(root).save_results(
        PLAN,
        {
            "stages": stages,
            "R": [{}, {}, {}, {}],
            "fairness": [
                {},
                {},
                {},
                {r: {"worst_site": "hospital-b", "gap": g} for r, g in GAPS.items()},
            ],
            "holdout_sites": ["hospital-e"],
            "unseen": [{}, {}, {}, UNSEEN],
        },
    )
    return root


def gate(registry: Path, *args: str) -> Result:
    return runner.invoke(
        full_app(), ["model", "gate", "v0004-pet", *args, "--registry", str(registry)]
    )


def test_a_version_above_every_threshold_passes(registry: Path) -> None:
    result = gate(
        registry,
        "--min", "lesion-class=0.6",
        "--min", "lesion-seg@pet=0.75",
        "--max-gap", "lesion-class=0.05",
        "--min-unseen", "survival@ct=0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "passes" in result.stdout and "FAIL" not in result.stdout
    assert_fits_80(result.stdout, "lesion-class@ct", "lesion-seg@pet", "survival@ct", "max-gap")


def test_a_version_below_a_threshold_exits_1_with_every_reason(registry: Path) -> None:
    # lesion-seg (bare task) = both routes: @ct 0.71 < 0.72 fails, @pet 0.76 passes;
    # gap of lesion-seg@ct 0.30 > 0.25 fails; unseen lesion-seg@ct 0.40 < 0.5 fails and the
    # held-out site has no PET: lesion-seg@pet has no unseen value, which fails closed
    result = gate(
        registry,
        "--min", "lesion-seg=0.72",
        "--max-gap", "lesion-seg=0.25",
        "--min-unseen", "lesion-seg=0.5",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "fails 4 of 6 check(s)" in result.stdout
    assert result.stderr.splitlines() == [
        "lesion-seg@ct: pooled test metric 0.710 < 0.72",
        "lesion-seg@ct: best - worst site gap 0.300 > 0.25",  # @pet's 0.20 passes
        "lesion-seg@ct: unseen-site metric 0.400 < 0.5",
        "lesion-seg@pet: no unseen-site metric (no held-out site evaluated it; see "
        "[evaluation] holdout_sites)",
    ]


def test_gate_json_lists_every_check(registry: Path) -> None:
    result = gate(registry, "--min", "survival=0.7", "--max-gap", "survival=0.2", "--json")
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    assert set(payload) == {"version", "passed", "checks", "failures"}
    assert payload["version"] == "v0004-pet" and payload["passed"] is False
    assert payload["checks"] == [
        {
            "check": "min",
            "task": "survival",
            "route": "survival@ct",
            "threshold": 0.7,
            "value": pytest.approx(0.66),
            "passed": False,
            "reason": "survival@ct: pooled test metric 0.660 < 0.7",
        },
        {
            "check": "max-gap",
            "task": "survival",
            "route": "survival@ct",
            "threshold": 0.2,
            "value": pytest.approx(0.12),
            "passed": True,
            "reason": "",
        },
    ]
    assert payload["failures"] == ["survival@ct: pooled test metric 0.660 < 0.7"]
    ok = json.loads(gate(registry, "--min", "survival=0.6", "--json").stdout)
    assert ok["passed"] is True and ok["failures"] == []


def test_a_task_the_version_lacks_is_a_usage_error_naming_the_known_tasks(
    registry: Path,
) -> None:
    result = gate(registry, "--min", "tumour-grade=0.5", "--min-unseen", "lesion-class@pet=0.5")
    assert result.exit_code == 2
    assert result.stdout == ""
    message = result.stderr
    assert "no task 'lesion-class@pet', 'tumour-grade'" in message
    assert "its tasks: lesion-class, lesion-seg, survival" in message
    assert "lesion-seg@pet" in message  # the routes too


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), "give at least one of --min, --max-gap, --min-unseen"),
        (("--min", "lesion-class"), "--min 'lesion-class': give TASK=VALUE"),
        (("--max-gap", "lesion-class=wide"), "--max-gap 'lesion-class=wide'"),
        (("--min", "lesion-class=nan"), "with a finite number"),
    ],
)
def test_malformed_gates_exit_2(registry: Path, args: tuple[str, ...], expected: str) -> None:
    result = gate(registry, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_an_unknown_version_exits_1(registry: Path) -> None:
    result = runner.invoke(
        full_app(), ["model", "gate", "v0042", "--min", "a=1", "--registry", str(registry)]
    )
    assert result.exit_code == 1 and "v0042" in result.stderr


def test_lineage_figures_take_precedence_over_results_json(registry: Path) -> None:
    reg = Registry(registry)
    model, manifest = reg.load("v0004-pet")
    lineage = manifest.lineage
    metrics = {**lineage.metrics, "gap/lesion-class@ct": 0.5, "unseen/lesion-class@ct": 0.2}
    metrics.update({f"gap/{r}": 0.01 for r in GAPS if r != "lesion-class@ct"})
    version = reg.commit(
        model, lineage=lineage.model_copy(update={"metrics": metrics, "parent": "v0004-pet"})
    )
    result = runner.invoke(
        full_app(),
        ["model", "gate", version, "--max-gap", "lesion-class=0.1", "--min-unseen",
         "lesion-class=0.3", "--json", "--registry", str(registry)],
    )  # fmt: skip
    payload = json.loads(result.stdout)
    assert result.exit_code == 1
    assert [c["value"] for c in payload["checks"]] == [0.5, 0.2]
