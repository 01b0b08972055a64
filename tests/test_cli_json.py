"""The operator's command line in an 80-column terminal, and ``--json`` on every read command.

The registry here is built by hand with the names, sites and metrics the quick UNICON
scenario (``unicon simulate --quick --dp 3``) writes, so the tests run in well under a
second each. Every ``--json`` output is parsed and checked against the keys the README
documents; every exit code (0 ok, 1 problems found, 2 usage error) is exercised.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from server.registry import CompletedStage, Registry, RunProgress, StageInProgress
from unicon_cli.main import full_app
from unicon_model.checkpoint import Lineage
from unicon_model.model import UniconModel
from unicon_model.schema import ModalitySpec, ModelSpec, TaskSpec, load_plan

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plans" / "unicon.toml"
PLAN = "unicon-ct-pet"
SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
STAGES = ["foundation", "prognosis", "segmentation", "pet"]
ROUTES = {
    "foundation": "lesion-class@ct",
    "prognosis": "survival@ct",
    "segmentation": "lesion-seg@ct",
    "pet": "lesion-seg@pet",
}

# keys documented in README.md, "Scripting: --json and exit codes"
LS_KEYS = {"registry", "versions", "problems"}
VERSION_KEYS = {
    "version",
    "plan",
    "stage",
    "parent",
    "sites",
    "site_count",
    "rounds",
    "max_epsilon",
    "epsilon",
    "metric",
    "metric_value",
    "metrics",
    "parameters",
    "created_at",
}
STATUS_PLAN_KEYS = {"plan", "plan_digest", "completed", "current", "stages"}
STATUS_STAGE_KEYS = {
    "stage",
    "state",
    "version",
    "sites",
    "site_count",
    "round",
    "rounds",
    "loss",
    "metric",
    "metric_value",
    "worst_site",
    "worst",
}
STAGE_DETAIL_KEYS = STATUS_STAGE_KEYS | {
    "plan",
    "round_records",
    "pooled",
    "per_site",
    "fairness",
    "unseen",
    "epsilon",
    "lineage_metrics",
}
SITES_KEYS = {"superlink", "ok", "error", "sites", "counts"}
SITE_ROW_KEYS = {
    "node_id",
    "owner",
    "status",
    "registered_at",
    "online_at",
    "offline_at",
    "online_seconds",
}


def _model() -> UniconModel:
    model = UniconModel(ModelSpec(spatial_dims=2, widths=(2, 4), seed=1))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="lesion-class", kind="classification", classes=("a", "b")))
    return model


def build_quick_registry(root: Path) -> Path:
    """A registry as the quick scenario with ``--dp 3`` leaves it: four stages, four sites."""
    reg = Registry(root)
    model = _model()
    pooled: dict[str, float] = {}
    parent: str | None = None
    completed = []
    for index, stage in enumerate(STAGES):
        sites = SITES[:2] if stage == "pet" else SITES  # PET only at two sites
        pooled = {**pooled, ROUTES[stage]: 0.61 + 0.05 * index}
        for round_ in (1, 2):
            reg.append_metrics(
                PLAN,
                {
                    "kind": "round",
                    "stage": stage,
                    "round": round_,
                    "sites": sites,
                    "loss": 0.9 / round_,
                    "val_score": 0.5 + 0.1 * round_,
                    "wall_s": 1.25,
                },
            )
        # every site 0.01 below the pooled value, the last one 0.05 below: the worst site
        per_site = {
            s: {k: v - (0.05 if s == sites[-1] else 0.01) for k, v in pooled.items()} for s in sites
        }
        fairness = {
            route: {
                "worst_site": sites[-1],
                "worst": value - 0.05,
                "best_site": sites[0],
                "best": value - 0.01,
                "gap": 0.04,
            }
            for route, value in pooled.items()
        }
        reg.append_metrics(
            PLAN,
            {
                "kind": "evaluation",
                "stage": stage,
                "per_site": per_site,
                "pooled": pooled,
                "fairness": fairness,
            },
        )
        lineage = Lineage(
            plan=PLAN,
            stage=stage,
            stage_index=index,
            parent=parent,
            sites=sites,
            rounds=2,
            epsilon={s: 2.5 + 0.1 * i for i, s in enumerate(SITES)},
            metrics={**pooled, "val/kept_round": 2.0, "val/score": 0.7},
        )
        parent = reg.commit(model, lineage=lineage)
        completed.append(CompletedStage(stage=stage, version=parent))
    reg.save_progress(RunProgress(plan=PLAN, completed=completed))
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return build_quick_registry(tmp_path / "registry")


@pytest.fixture(autouse=True)
def columns_80(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 80-column terminal, as in an ssh session or a CI log."""
    import client.cli
    import server.cli
    import server.registry_cli
    import unicon_model.cli

    monkeypatch.setenv("COLUMNS", "80")
    for module in (client.cli, server.cli, server.registry_cli, unicon_model.cli):
        monkeypatch.setattr(module.console, "width", 80)


def invoke(*args: str) -> Result:
    return runner.invoke(full_app(), list(args))


def assert_fits_80(text: str, *names: str) -> None:
    """No line wider than 80, no cell cut with an ellipsis, every name printed whole."""
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text
    for name in names:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (name, text)


def parse(result: Result, code: int = 0) -> Any:
    """The command's stdout as JSON, after checking its exit code."""
    assert result.exit_code == code, result.output
    return json.loads(result.stdout)


# --------------------------------------------------------------------------- model ls / show


def test_model_ls_is_one_line_per_version_at_80_columns(registry: Path) -> None:
    result = invoke("model", "ls", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    versions = Registry(registry).versions()
    assert versions[-1] == "v0004-pet"
    assert_fits_80(result.stdout, *versions, "lesion-seg@pet", "lesion-class@ct")
    rows = [line for line in result.stdout.splitlines() if line.startswith("v000")]
    assert len(rows) == 4  # one line per version, sites counted, not listed
    assert "hospital-a" not in result.stdout
    pet = next(line for line in rows if line.startswith("v0004-pet"))
    # 2 sites, 2 rounds, max ε, and the stage's own route (the one new since the parent)
    assert re.search(r"^v0004-pet\s+2\s+2\s+2\.8\s+lesion-seg@pet 0\.760", pet), pet


@pytest.mark.parametrize(
    ("width", "columns"),
    [(90, ("parent",)), (200, ("plan", "stage", "parent", "parameters", "created"))],
)
def test_model_ls_shows_more_columns_on_a_wide_terminal(
    registry: Path, monkeypatch: pytest.MonkeyPatch, width: int, columns: tuple[str, ...]
) -> None:
    import server.registry_cli

    monkeypatch.setattr(server.registry_cli.console, "width", width)
    result = invoke("model", "ls", "--registry", str(registry))
    assert "…" not in result.stdout
    header = result.stdout.splitlines()[1]
    for column in columns:
        assert column in header, header
    pet = next(line for line in result.stdout.splitlines() if line.startswith("v0004-pet"))
    assert "v0003-segmentation" in pet


def test_model_ls_json_matches_the_documented_keys(registry: Path) -> None:
    payload = parse(invoke("model", "ls", "--json", "--registry", str(registry)))
    assert set(payload) == LS_KEYS and payload["problems"] == []
    assert [v["version"] for v in payload["versions"]] == Registry(registry).versions()
    for entry in payload["versions"]:
        assert set(entry) == VERSION_KEYS
    pet = payload["versions"][-1]
    assert pet["parent"] == "v0003-segmentation" and pet["sites"] == SITES[:2]
    assert pet["site_count"] == 2 and pet["max_epsilon"] == pytest.approx(2.8)
    assert pet["metric"] == "lesion-seg@pet" and pet["metric_value"] == pytest.approx(0.76)


def test_model_ls_with_a_damaged_version_lists_the_rest_and_exits_1(registry: Path) -> None:
    manifest = registry / "versions" / "v0002-prognosis" / "manifest.json"
    manifest.write_text("{")
    listing = invoke("model", "ls", "--registry", str(registry))
    assert listing.exit_code == 1
    assert "damaged" in listing.stdout and "v0001-foundation" in listing.stdout
    assert str(manifest) in listing.stderr  # the message goes to stderr, whole
    payload = parse(invoke("model", "ls", "--json", "--registry", str(registry)), code=1)
    assert [v["version"] for v in payload["versions"]] == [
        "v0001-foundation",
        "v0003-segmentation",
        "v0004-pet",
    ]
    assert len(payload["problems"]) == 1 and str(manifest) in payload["problems"][0]


def test_model_show_carries_every_detail_at_80_columns(registry: Path) -> None:
    result = invoke("model", "show", "v0004-pet", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert_fits_80(result.stdout, "v0003-segmentation", *SITES, *ROUTES.values(), "backbone")
    assert "2.8" in result.stdout  # ε of hospital-d, which did not contribute to the PET stage
    shown = parse(invoke("model", "show", "v0004-pet", "--json", "--registry", str(registry)))
    assert set(shown) == {"format", "version", "model_config", "components", "lineage"}
    assert shown["lineage"]["sites"] == SITES[:2]


def test_model_commands_exit_codes(registry: Path, tmp_path: Path) -> None:
    assert invoke("model", "show", "v0009", "--registry", str(registry)).exit_code == 1
    assert invoke("model", "ls", "--registry", str(tmp_path / "none")).exit_code == 1
    assert invoke("model", "ls", "--bogus", "--registry", str(registry)).exit_code == 2
    assert invoke("model", "show", "--registry", str(registry)).exit_code == 2


def test_model_export_says_what_it_wrote(registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "package"
    result = invoke("model", "export", "v0001-foundation", str(out), "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert "file(s)" in result.stdout and "bytes" in result.stdout
    for written in ("predict.py", "README.md", "model/manifest.json"):
        assert (out / written).is_file()
        assert written in result.stdout, written


# --------------------------------------------------------------------------- status


def test_status_is_one_line_per_stage_at_80_columns(registry: Path) -> None:
    result = invoke("status", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert_fits_80(result.stdout, *STAGES, *ROUTES.values())
    rows = [
        line for line in result.stdout.splitlines() if line.split()[:1] in ([s] for s in STAGES)
    ]
    assert len(rows) == 4
    # the worst site of the stage's own route: hospital-b, 0.05 below the pooled 0.760
    pet = r"^pet\s+done\s+2\s+2\s+0\.45\s+lesion-seg@pet 0\.760\s+hospital-b 0\.710$"
    assert re.search(pet, rows[-1].rstrip()), rows
    assert re.search(r"foundation\s.*lesion-class@ct 0\.610\s+hospital-d 0\.560", rows[0]), rows


def test_status_json_matches_the_documented_keys(registry: Path) -> None:
    payload = parse(invoke("status", "--json", "--registry", str(registry)))
    assert set(payload) == {PLAN}
    plan = payload[PLAN]
    assert set(plan) == STATUS_PLAN_KEYS
    assert [s["stage"] for s in plan["stages"]] == STAGES
    for row in plan["stages"]:
        assert set(row) == STATUS_STAGE_KEYS
    last = plan["stages"][-1]
    assert last["state"] == "done" and last["version"] == "v0004-pet"
    assert last["round"] == 2 and last["site_count"] == 2 and last["metric"] == "lesion-seg@pet"
    assert last["worst_site"] == "hospital-b" and last["worst"] == pytest.approx(0.71)
    assert plan["stages"][0]["worst_site"] == "hospital-d"
    # scriptable: "deploy only if the last stage is done"
    assert all(s["state"] == "done" for s in plan["stages"])


def test_status_of_a_stage_in_progress_shows_round_of_rounds(registry: Path) -> None:
    reg = Registry(registry)
    progress = reg.progress(PLAN)
    reg.save_progress(
        progress.model_copy(update={"current": StageInProgress(stage="pet-2", round=1)})
    )
    record = {"kind": "round", "stage": "pet-2", "round": 1, "rounds": 3, "sites": SITES}
    reg.append_metrics(PLAN, {**record, "loss": 0.5, "val_score": 0.55})
    row = parse(invoke("status", "--json", "--registry", str(registry)))[PLAN]["stages"][-1]
    assert row["state"] == "in progress" and row["version"] is None
    assert (row["round"], row["rounds"]) == (1, 3)
    assert (row["metric"], row["metric_value"]) == ("val/score", 0.55)
    text = invoke("status", "--registry", str(registry)).stdout
    assert_fits_80(text, "pet-2", "in progress")
    assert re.search(r"pet-2\s+in progress\s+4\s+1/3", text), text


def test_status_stage_carries_every_detail(registry: Path) -> None:
    result = invoke("status", "--stage", "pet", "--registry", str(registry))
    assert result.exit_code == 0, result.output
    assert_fits_80(result.stdout, "v0004-pet", *SITES[:2], "lesion-seg@pet", "pooled")
    payload = parse(invoke("status", "--stage", "pet", "--json", "--registry", str(registry)))
    assert set(payload) == STAGE_DETAIL_KEYS
    assert payload["plan"] == PLAN and payload["version"] == "v0004-pet"
    assert [r["round"] for r in payload["round_records"]] == [1, 2]
    assert set(payload["per_site"]) == set(SITES[:2])
    assert payload["pooled"]["lesion-seg@pet"] == pytest.approx(0.76)
    assert set(payload["epsilon"]) == set(SITES)
    assert payload["fairness"]["lesion-class@ct"] == {
        "worst_site": "hospital-b",
        "worst": pytest.approx(0.56),
        "gap": pytest.approx(0.04),
    }
    assert payload["unseen"] == {"pooled": {}, "per_site": {}}  # no site held out
    assert re.search(r"lesion-seg@pet\s+hospital-b\s+0\.710\s+0\.040", result.stdout)


def test_status_stage_shows_the_unseen_site(registry: Path) -> None:
    unseen = {"sites": ["hospital-e"], "pooled": {"lesion-seg@pet": 0.5}}
    unseen["per_site"] = {"hospital-e": {"lesion-seg@pet": 0.5}}
    record = {"kind": "evaluation", "stage": "pet", "per_site": {}, "pooled": {}}
    Registry(registry).append_metrics(PLAN, {**record, "unseen": unseen})
    payload = parse(invoke("status", "--stage", "pet", "--json", "--registry", str(registry)))
    assert payload["unseen"] == {
        "pooled": {"lesion-seg@pet": 0.5},
        "per_site": {"hospital-e": {"lesion-seg@pet": 0.5}},
    }
    text = invoke("status", "--stage", "pet", "--registry", str(registry)).stdout
    assert_fits_80(text, "hospital-e (unseen)", "unseen pooled")
    # a status row without a fairness record shows "-" for the worst site
    row = parse(invoke("status", "--json", "--registry", str(registry)))[PLAN]["stages"][-1]
    assert row["worst_site"] is None and row["worst"] is None


def test_status_exit_codes(registry: Path, tmp_path: Path) -> None:
    unknown = invoke("status", "--stage", "nope", "--registry", str(registry))
    assert unknown.exit_code == 1 and "foundation" in unknown.stderr  # names the known ones
    assert unknown.stdout == ""
    assert invoke("status", "--registry", str(tmp_path / "none")).exit_code == 1
    assert invoke("status", "--bogus", "--registry", str(registry)).exit_code == 2
    Registry(registry).save_progress(RunProgress(plan="other"))
    both = invoke("status", "--stage", "pet", "--registry", str(registry))
    assert both.exit_code == 2 and "--plan" in both.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert parse(invoke("status", "--json", "--registry", str(empty))) == {}


# --------------------------------------------------------------------------- server sites


def test_server_sites_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    import server.cli

    answer = {
        "success": True,
        "nodes": [
            {
                "node-id": "123",
                "owner-name": "hospital-a",
                "status": "online",
                "created-at": "2025-01-01 10:00:00Z",
                "online-at": "2025-01-01 10:01:00Z",
                "online-elapsed": 61.0,
                "offline-at": "N/A",
                "deleted-at": "N/A",
            }
        ],
    }
    calls: list[list[str]] = []

    def fake_run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(answer), stderr="")

    monkeypatch.setattr(server.cli.subprocess, "run", fake_run)
    state = ["--state", str(tmp_path)]
    payload = parse(invoke("server", "sites", "--json", *state))
    assert "--format" in calls[0] and "json" in calls[0]
    assert set(payload) == SITES_KEYS and payload["ok"] is True
    assert set(payload["sites"][0]) == SITE_ROW_KEYS
    assert payload["sites"][0]["status"] == "online" and payload["counts"] == {"online": 1}
    answer.clear()
    answer.update({"success": False, "error-message": "connection refused"})
    failed = parse(invoke("server", "sites", "--json", *state), code=1)
    assert failed["ok"] is False and "connection refused" in failed["error"]
    assert "connection refused" in invoke("server", "sites", "--json", *state).stderr


# --------------------------------------------------------------------------- plan check


def test_plan_check_json(tmp_path: Path) -> None:
    payload = parse(invoke("plan", "check", "--json", str(EXAMPLE)))
    assert set(payload) == {"plan", "ok", "name", "problems", "warnings", "stages", "augmentation"}
    assert payload["ok"] is True and payload["name"] == PLAN and payload["problems"] == []
    assert [s["name"] for s in payload["stages"]] == load_plan(EXAMPLE).stage_names
    assert set(payload["stages"][0]) == {
        "name",
        "adds",
        "trains",
        "objectives",
        "modalities",
        "rounds",
        "secure_aggregation",
        "privacy",
    }
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[[stages]]\nname = "s1"\nrounds = 0\n')
    failed = parse(invoke("plan", "check", "--json", str(bad)), code=1)
    assert failed["ok"] is False and failed["stages"] == []
    assert any("stages[0].rounds" in p for p in failed["problems"])
    assert invoke("plan", "check", "--bogus", str(bad)).exit_code == 2


def test_plan_check_fits_80_columns() -> None:
    result = invoke("plan", "check", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert_fits_80(result.stdout, *load_plan(EXAMPLE).stage_names, "task/lesion-seg")


# --------------------------------------------------------------------------- site check/audit


def test_site_check_json_and_exit_codes(sites_dir: Path, tmp_path: Path) -> None:
    manifest = sites_dir / "hospital-a" / "manifest.yaml"
    payload = parse(invoke("site", "check", "--json", str(manifest)))
    assert set(payload) == {
        "manifest",
        "ok",
        "site",
        "cases",
        "errors",
        "warnings",
        "counts",
    }
    assert payload["ok"] is True and payload["site"] == "hospital-a" and payload["cases"] > 0
    assert set(payload["counts"]) >= {"tasks", "modalities"}
    bad = tmp_path / "manifest.yaml"
    bad.write_text(manifest.read_text().replace("images:", "imgs:", 1))
    failed = parse(invoke("site", "check", "--json", str(bad)), code=1)
    assert failed["ok"] is False and failed["errors"]
    assert set(failed["errors"][0]) == {"severity", "case", "field", "message"}
    assert invoke("site", "check", "--bogus", str(bad)).exit_code == 2


def test_site_check_progress_bar_goes_to_its_own_console(sites_dir: Path) -> None:
    from client.manifest_check import check_manifest

    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=80)
    report = check_manifest(
        sites_dir / "hospital-a" / "manifest.yaml", progress=True, progress_console=terminal
    )
    assert report.ok
    assert "reading" in buffer.getvalue()


def test_site_audit_json_and_exit_codes(tmp_path: Path) -> None:
    from client.audit import AuditLog

    state = tmp_path / "state"
    state.mkdir()
    log = AuditLog(state / "audit.jsonl")
    for round_ in (1, 2):
        log.append("train", {"stage": "foundation", "round": round_, "epsilon": 0.5 * round_})
    payload = parse(invoke("site", "audit", "--json", "--state-dir", str(state)))
    assert set(payload) == {
        "log",
        "ok",
        "entries",
        "unsigned",
        "first_broken",
        "reason",
        "tail",
    }
    assert payload["ok"] is True and payload["entries"] == 2
    assert set(payload["tail"][0]) == {"seq", "time", "event", "record"}
    lines = (state / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["record"]["epsilon"] = 0.0
    lines[0] = json.dumps(entry)
    (state / "audit.jsonl").write_text("\n".join(lines) + "\n")
    broken = parse(invoke("site", "audit", "--json", "--state-dir", str(state)), code=1)
    assert broken["ok"] is False and broken["first_broken"] == 1 and broken["tail"] == []
    assert invoke("site", "audit", "--bogus", "--state-dir", str(state)).exit_code == 2


# --------------------------------------------------------------------------- simulate --json


class _FakeCoordinator:
    """Stands in for the in-process federation: writes the quick scenario's registry."""

    def __init__(self, plan: Any, registry: Registry, transport: Any, **_: Any) -> None:
        self.registry = registry

    def run(self) -> None:
        build_quick_registry(self.registry.root)
        pooled: dict[str, float] = {}
        rows = []
        for index, stage in enumerate(STAGES):
            pooled = {**pooled, ROUTES[stage]: 0.61 + 0.05 * index}
            rows.append(dict(pooled))
        self.registry.save_results(
            PLAN,
            {
                "stages": STAGES,
                "R": rows,
                "R_per_site": {},
                "bytes_up": {s: 1000 for s in SITES},
                "epsilon": {s: 2.5 for s in SITES},
            },
        )


class _Failing(_FakeCoordinator):
    def run(self) -> None:
        raise RuntimeError("site hospital-a vanished")


@pytest.mark.slow
def test_simulate_json_prints_only_the_summary_on_stdout(
    sites_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.coordinator
    import simulations.inprocess

    monkeypatch.setattr(server.coordinator, "Coordinator", _FakeCoordinator)
    monkeypatch.setattr(simulations.inprocess, "InProcessTransport", lambda *a, **k: None)
    args = ["simulate", "--quick", "--engine", "inprocess", "--sites", str(sites_dir), "--json"]
    result = invoke(*args, "--out", str(tmp_path / "report"))
    payload = parse(result)  # stdout is the JSON document alone
    assert set(payload) == {
        "plan",
        "engine",
        "sites",
        "versions",
        "wall_s",
        "stages",
        "tasks",
        "R",
        "acc",
        "bwt",
        "forgetting",
        "max_epsilon",
        "bytes_up",
        "report",
        "methods",
    }
    assert payload["plan"] == PLAN and payload["stages"] == STAGES
    assert payload["versions"][-1] == "v0004-pet" and payload["bwt"] == pytest.approx(0.0)
    assert payload["R"][0][1] is None  # a task not yet learned: NaN becomes null
    assert set(payload["methods"]) == {"unicon"} and payload["max_epsilon"] == 2.5
    assert "ACC" in result.stderr  # the human summary and progress went to stderr
    monkeypatch.setattr(server.coordinator, "Coordinator", _Failing)
    failed = invoke(*args, "--out", str(tmp_path / "failed"))
    assert failed.exit_code == 1 and failed.stdout == ""
    assert "hospital-a vanished" in failed.stderr
    assert invoke("simulate", "--json", "--engine", "warp").exit_code == 2
