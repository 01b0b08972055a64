"""`unicon model ls/show/export` and `unicon status` over damaged registry files.

Every damaged file gives a clear message naming the file and what to do, exit code 1 and no
traceback; a torn last line of ``metrics.jsonl`` is skipped with a warning (exit code 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from server.registry import CompletedStage, Registry, RunProgress, StageInProgress
from unicon_cli.main import full_app
from unicon_model.checkpoint import Lineage
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, TaskSpec

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables at full width, as on a wide terminal (no wrapped or truncated cells)."""
    import server.cli
    import server.registry_cli

    for module in (server.cli, server.registry_cli):
        monkeypatch.setattr(module.console, "width", 200)


def tiny_model() -> UniconModel:
    model = UniconModel(ModelSpec(spatial_dims=2, widths=(2, 4), seed=1))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="cls", kind="classification", classes=("a", "b")))
    return model


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """Two committed versions and a plan with one done and one running stage."""
    root = tmp_path / "registry"
    reg = Registry(root)
    first = reg.commit(tiny_model(), lineage=Lineage(plan="tiny", stage="foundation"))
    reg.commit(tiny_model(), lineage=Lineage(plan="tiny", stage="prognosis", parent=first))
    reg.save_progress(
        RunProgress(
            plan="tiny",
            completed=[CompletedStage(stage="foundation", version=first)],
            current=StageInProgress(stage="prognosis", round=1),
        )
    )
    for stage, loss in (("foundation", 0.5), ("prognosis", 0.25)):
        reg.append_metrics(
            "tiny", {"kind": "round", "stage": stage, "round": 1, "loss": loss, "sites": ["h-a"]}
        )
    return root


def invoke(*args: str) -> Result:
    return runner.invoke(full_app(), list(args))


def assert_clean_failure(result: Result, *expected: str) -> None:
    """Exit code 1, every expected text in the output (unwrapped), and no traceback."""
    text = result.output
    assert result.exit_code == 1, text
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in text
    for part in expected:
        assert part in text, (part, text)


def test_a_corrupt_manifest_names_the_file_in_ls_show_and_export(
    registry: Path, tmp_path: Path
) -> None:
    manifest = registry / "versions" / "v0002-prognosis" / "manifest.json"
    manifest.write_text('{"format": "unicon-checkpoint/1", "versi')
    listing = invoke("model", "ls", "--registry", str(registry))
    assert_clean_failure(listing, str(manifest), "is not valid JSON", "restore it from a backup")
    assert "v0001-foundation" in listing.output  # the intact version is still listed
    shown = invoke("model", "show", "v0002-prognosis", "--registry", str(registry))
    assert_clean_failure(shown, str(manifest), "restore it from a backup")
    out = tmp_path / "package"
    exported = invoke("model", "export", "v0002-prognosis", str(out), "--registry", str(registry))
    assert_clean_failure(exported, str(manifest))
    assert not out.exists()
    ok = invoke("model", "show", "v0001-foundation", "--json", "--registry", str(registry))
    assert ok.exit_code == 0, ok.output


def test_a_manifest_of_the_wrong_shape_is_named_too(registry: Path) -> None:
    manifest = registry / "versions" / "v0001-foundation" / "manifest.json"
    manifest.write_text('{"format": "unicon-checkpoint/1", "components": 3}')
    shown = invoke("model", "show", "v0001-foundation", "--registry", str(registry))
    assert_clean_failure(shown, str(manifest), "malformed")


def test_version_ids_that_are_paths_are_refused(registry: Path, tmp_path: Path) -> None:
    for bad in ("../../etc", "/etc", "v0001-foundation/../../x"):
        shown = invoke("model", "show", bad, "--registry", str(registry))
        assert_clean_failure(shown, "is not a valid version id", "versions: ['v0001-foundation'")
        pkg = str(tmp_path / "pkg")
        exported = invoke("model", "export", bad, pkg, "--registry", str(registry))
        assert_clean_failure(exported, "is not a valid version id")
    assert not (tmp_path / "pkg").exists()


def test_status_skips_a_torn_last_metrics_line_with_a_warning(registry: Path) -> None:
    metrics = registry / "runs" / "tiny" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"kind": "round", "stage": "prog')
    result = invoke("status", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and str(metrics) in result.output
    assert "line 3 is incomplete" in result.output
    assert "foundation" in result.output and "0.25" in result.output


def test_status_names_a_corrupt_metrics_line_in_the_middle(registry: Path) -> None:
    metrics = registry / "runs" / "tiny" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    result = invoke("status", "--registry", str(registry))
    assert_clean_failure(result, str(metrics), "line 2 is corrupt", "fix or delete that line")


def test_status_tolerates_records_with_odd_fields(registry: Path) -> None:
    metrics = registry / "runs" / "tiny" / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"kind": "round", "stage": "prognosis", "loss": "x", "sites": 3}\n')
        handle.write('{"kind": "evaluation", "stage": "foundation", "pooled": {"auc": "y"}}\n')
        handle.write('{"kind": "round", "stage": ["not", "a", "name"]}\n')
    result = invoke("status", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert "foundation" in result.output and "prognosis" in result.output
    listed = json.loads(invoke("status", "--json", "--registry", str(registry)).stdout)
    stages = {s["stage"]: s for s in listed["tiny"]["stages"]}
    # the odd values are shown as absent, never as a wrong number
    assert stages["prognosis"]["loss"] is None and stages["prognosis"]["sites"] == []
    assert stages["foundation"]["metric"] is None
    detail = json.loads(
        invoke("status", "--stage", "foundation", "--json", "--registry", str(registry)).stdout
    )
    assert detail["pooled"] == {}


def test_status_names_a_corrupt_progress_file(registry: Path) -> None:
    progress = registry / "runs" / "tiny" / "progress.json"
    progress.write_text('{"plan": "tiny", "completed": [')
    for extra in ([], ["--json"], ["--plan", "tiny"]):
        result = invoke("status", "--registry", str(registry), *extra)
        assert_clean_failure(result, str(progress), "is corrupt", "restore")
    progress.write_text('{"plan": "tiny", "completed": [{"stage": 3}]}')
    result = invoke("status", "--registry", str(registry))
    assert_clean_failure(result, str(progress), "completed.0.stage", "completed.0.version")


def test_status_refuses_plan_names_that_are_paths_and_missing_registries(
    registry: Path, tmp_path: Path
) -> None:
    result = invoke("status", "--registry", str(registry), "--plan", "../../etc")
    assert_clean_failure(result, "plan '../../etc' is not a valid name")
    missing = invoke("status", "--registry", str(tmp_path / "nowhere"))
    assert_clean_failure(missing, "does not exist")
    assert not (tmp_path / "nowhere").exists()
