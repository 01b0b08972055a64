"""Registry: concurrent commits, deleted versions, torn logs, atomic writes, safe paths."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import server.registry as registry_module
from server.errors import RegistryError
from server.registry import LOCK_NAME, Registry, RunProgress, StageInProgress
from unicon_model.checkpoint import Lineage, verify_checkpoint
from unicon_model.model import UniconModel
from unicon_model.names import UnsafeNameError
from unicon_model.schema import ModalitySpec, ModelSpec, TaskSpec


def tiny_model(seed: int = 3) -> UniconModel:
    model = UniconModel(ModelSpec(spatial_dims=2, widths=(2, 4), seed=seed))
    model.add_modality(ModalitySpec(name="ct"))
    model.add_task(TaskSpec(name="cls", kind="classification", classes=("a", "b")))
    return model


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {str(p.relative_to(directory)): p.read_bytes() for p in files}


def _commit_in_child(root: str, seed: int, start: float, out: multiprocessing.Queue) -> None:
    time.sleep(max(0.0, start - time.time()))
    version = Registry(root).commit(tiny_model(seed), lineage=Lineage(plan="p", stage="child"))
    out.put(version)


# ---------------------------------------------------------------------- concurrent commits
def test_concurrent_commits_in_threads_get_distinct_intact_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.commit(tiny_model(), lineage=Lineage(stage="foundation"))
    barrier = threading.Barrier(3)
    versions: list[str] = []
    errors: list[BaseException] = []
    models = {seed: tiny_model(seed) for seed in (10, 11, 12)}  # seeding is process-global

    def commit(seed: int) -> None:
        try:
            barrier.wait()
            versions.append(
                Registry(tmp_path).commit(models[seed], lineage=Lineage(stage=f"s{seed}"))
            )
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(seed,)) for seed in (10, 11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    numbers = sorted(v.split("-")[0] for v in versions)
    assert numbers == ["v0002", "v0003", "v0004"]
    assert len(registry.versions()) == 4
    for version in versions:
        seed = int(version.split("-s")[1])
        model, manifest = registry.load(version)
        assert manifest.version == version
        for key, value in tiny_model(seed).state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (version, key)


def test_a_commit_in_another_process_at_the_same_time_gets_its_own_version(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    registry.commit(tiny_model(), lineage=Lineage(stage="foundation"))
    context = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = context.Queue()
    start = time.time() + 0.3
    child = context.Process(target=_commit_in_child, args=(str(tmp_path), 21, start, out))
    child.start()
    time.sleep(max(0.0, start - time.time()))
    mine = registry.commit(tiny_model(22), lineage=Lineage(plan="p", stage="parent"))
    child.join(timeout=30)
    if child.is_alive():  # pragma: no cover - never leave a stuck child behind
        child.kill()
        child.join()
    assert child.exitcode == 0
    theirs = out.get(timeout=5)
    assert {mine.split("-")[0], theirs.split("-")[0]} == {"v0002", "v0003"}
    assert registry.versions() == sorted(
        ["v0001-foundation", mine, theirs], key=lambda v: v.split("-")[0]
    )
    for version in (mine, theirs):
        assert verify_checkpoint(tmp_path / "versions" / version) == []


def test_commit_waits_for_the_lock_of_another_process_and_times_out_clearly(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[1]))\n",
            "0.4",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with (
            pytest.raises(RegistryError, match=r"\.registry\.lock is still locked"),
            registry.lock(timeout_s=0.05),
        ):
            pass
        began = time.monotonic()
        version = registry.commit(tiny_model(), lineage=Lineage(stage="foundation"))
        waited = time.monotonic() - began
    finally:
        holder.wait(timeout=10)
    assert version == "v0001-foundation"
    assert waited > 0.1  # it waited for the other process to let go


# ---------------------------------------------------------------------- numbering
def test_deleting_a_version_never_lets_a_commit_reuse_or_overwrite_one(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for stage in ("a", "b", "c"):
        registry.commit(tiny_model(), lineage=Lineage(stage=stage))
    shutil.rmtree(tmp_path / "versions" / "v0002-b")
    kept = snapshot(tmp_path / "versions" / "v0003-c")
    assert registry.commit(tiny_model(5), lineage=Lineage(stage="d")) == "v0004-d"
    assert snapshot(tmp_path / "versions" / "v0003-c") == kept
    # deleting the newest does not hand its number out again either
    shutil.rmtree(tmp_path / "versions" / "v0004-d")
    assert registry.commit(tiny_model(), lineage=Lineage(stage="e")) == "v0005-e"
    assert registry.versions() == ["v0001-a", "v0003-c", "v0005-e"]


def test_numbering_without_a_marker_and_with_a_leftover_reservation(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.commit(tiny_model(), lineage=Lineage(stage="a"))
    registry.commit(tiny_model(), lineage=Lineage(stage="b"))
    (tmp_path / "versions" / ".last-version").write_text("garbage")  # unreadable: ignored
    (tmp_path / "versions" / "v0007-c").mkdir()  # a commit that crashed after reserving
    assert registry.versions() == ["v0001-a", "v0002-b"]
    assert registry.commit(tiny_model(), lineage=Lineage(stage="c")) == "v0008-c"
    assert (tmp_path / "versions" / ".last-version").read_text().strip() == "8"


def test_a_failed_commit_leaves_no_reservation_and_keeps_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path)
    registry.commit(tiny_model(), lineage=Lineage(stage="a"))
    before = snapshot(tmp_path / "versions" / "v0001-a")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry_module, "save_checkpoint", broken)
    with pytest.raises(OSError, match="disk full"):
        registry.commit(tiny_model(), lineage=Lineage(stage="b"))
    assert not (tmp_path / "versions" / "v0002-b").exists()
    assert snapshot(tmp_path / "versions" / "v0001-a") == before
    monkeypatch.undo()
    assert registry.commit(tiny_model(), lineage=Lineage(stage="b")) == "v0003-b"


# ---------------------------------------------------------------------- names and paths
def test_versions_and_plans_that_would_leave_the_registry_are_refused(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    for bad in ("../../etc", "v0001/../../x", "/etc", "v1-x", "v0001-A B", ""):
        with pytest.raises(RegistryError, match="is not a valid version id"):
            registry.manifest(bad)
        with pytest.raises(RegistryError, match="is not a valid version id"):
            registry.load(bad)
    for bad in ("../x", "a/b", "..", "Plan"):
        with pytest.raises(UnsafeNameError, match=r"plan .* is not a valid name"):
            registry.progress(bad)
        with pytest.raises(UnsafeNameError):
            registry.append_metrics(bad, {"kind": "round"})
    with pytest.raises(UnsafeNameError, match=r"stage '\.\./x'"):
        registry.commit(tiny_model(), lineage=Lineage(stage="../x"))
    assert list((tmp_path / "versions").iterdir()) == []
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_corrupt_manifest_is_reported_with_the_file_and_the_fix(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    version = registry.commit(tiny_model(), lineage=Lineage(stage="a"))
    manifest = tmp_path / "versions" / version / "manifest.json"
    manifest.write_text('{"format": "unicon-checkpoint/1", "vers')
    for read in (registry.manifest, registry.load):
        with pytest.raises(RegistryError, match="restore it from a backup") as caught:
            read(version)
        assert str(manifest) in str(caught.value)


# ---------------------------------------------------------------------- run state files
def test_progress_round_trip_and_corrupt_or_foreign_progress(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.save_progress(RunProgress(plan="p", current=StageInProgress(stage="s", round=2)))
    assert registry.progress("p").current == StageInProgress(stage="s", round=2)
    path = tmp_path / "runs" / "p" / "progress.json"
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]  # no temporary left
    path.write_text('{"plan": "p", "compl')
    with pytest.raises(RegistryError, match=r"progress\.json is corrupt") as caught:
        registry.progress("p")
    assert str(path) in str(caught.value) and "restore" in str(caught.value)
    path.write_text(json.dumps({"plan": "other"}))
    with pytest.raises(RegistryError, match="progress of plan 'other', not 'p'"):
        registry.progress("p")


def test_a_failed_progress_write_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path)
    registry.save_progress(RunProgress(plan="p", current=StageInProgress(stage="s", round=1)))
    path = tmp_path / "runs" / "p" / "progress.json"
    before = path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError("crash during rename")

    monkeypatch.setattr(registry_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="crash during rename"):
        registry.save_progress(RunProgress(plan="p", current=StageInProgress(stage="s", round=2)))
    monkeypatch.undo()
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        registry.save_results("p", {"x": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["progress.json"]


def test_metrics_append_is_one_write_and_a_torn_last_line_is_skipped_then_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(tmp_path)
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(registry_module.os, "write", counting_write)
    registry.append_metrics("p", {"kind": "round", "stage": "s", "round": 1})
    monkeypatch.undo()
    assert writes == [b'{"kind": "round", "round": 1, "stage": "s"}\n']
    path = tmp_path / "runs" / "p" / "metrics.jsonl"
    with path.open("ab") as handle:
        handle.write(b'{"kind": "round", "sta')  # a crash mid-write
    log = registry.read_metrics("p")
    assert [r["round"] for r in log.records] == [1]
    assert len(log.warnings) == 1 and "line 2 is incomplete" in log.warnings[0]
    assert str(path) in log.warnings[0]
    registry.append_metrics("p", {"kind": "round", "stage": "s", "round": 2})
    assert path.read_text().splitlines() == [
        '{"kind": "round", "round": 1, "stage": "s"}',
        '{"kind": "round", "round": 2, "stage": "s"}',
    ]
    assert registry.read_metrics("p").warnings == []


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    path = tmp_path / "runs" / "p" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"round": 1}\n{"round": 2}')
    assert [r["round"] for r in registry.metrics("p")] == [1, 2]
    registry.append_metrics("p", {"round": 3})
    assert [r["round"] for r in registry.metrics("p")] == [1, 2, 3]


def test_a_corrupt_line_in_the_middle_names_the_file_and_line(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    path = tmp_path / "runs" / "p" / "metrics.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"round": 1}\n{"round": \n{"round": 3}\n')
    with pytest.raises(RegistryError, match=r"metrics.jsonl line 2 is corrupt"):
        registry.metrics("p")
    path.write_text('{"round": 1}\n[1, 2]\n')
    with pytest.raises(RegistryError, match=r"line 2 is corrupt \(not a JSON object\)"):
        registry.metrics("p")


def test_corrupt_results_are_named(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    path = tmp_path / "runs" / "p" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text("{")
    with pytest.raises(RegistryError, match=r"results\.json is corrupt"):
        registry.results("p")
    path.write_text("[]")
    with pytest.raises(RegistryError, match="not a JSON object"):
        registry.results("p")


def test_a_round_save_cut_between_its_renames_resumes_from_the_previous_round(
    tmp_path: Path,
) -> None:
    registry = Registry(tmp_path)
    model = tiny_model(4)
    registry.save_round("p", "s", 1, model, Lineage(stage="s"))
    run = tmp_path / "runs" / "p"
    os.replace(run / "round", run / ".round-old")  # the crash: first rename done, not the second
    resumed = registry.load_round("p")
    assert resumed is not None and resumed[1].version == "s-round-1"
    assert registry.progress("p").current == StageInProgress(stage="s", round=1)
    (run / ".round-old" / "manifest.json").write_text("{")
    with pytest.raises(RegistryError, match="delete it to restart the stage"):
        registry.load_round("p")
