"""Durable writes and file locks: content, cleanup after failures, modes, exclusion."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from unicon_model import durable
from unicon_model.durable import (
    atomic_write,
    file_lock,
    fsync_directory,
    write_synced,
    write_temporary,
)

_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
op = fcntl.LOCK_EX if sys.argv[2] == "ex" else fcntl.LOCK_SH
try:
    fcntl.flock(fd, op | fcntl.LOCK_NB)
except BlockingIOError:
    print("blocked")
else:
    print("acquired")
"""


def _try_lock_elsewhere(path: Path, kind: str) -> str:
    """Try a non-blocking lock on ``path`` from another process: "acquired" or "blocked"."""
    done = subprocess.run(
        [sys.executable, "-c", _TRY_LOCK, str(path), kind],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.strip()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------- atomic writes
def test_atomic_write_bytes_text_and_writer_replace_the_file_and_leave_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"\x00first\n")
    assert path.read_bytes() == b"\x00first\n"
    atomic_write(path, "zweite Fassung ü\n")
    assert path.read_bytes() == "zweite Fassung ü\n".encode()
    atomic_write(path, lambda tmp: tmp.write_bytes(b"third"), fsync=False, fsync_dir=False)
    assert path.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert _mode(path) == 0o600  # mkstemp's mode unless another is asked for


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
def test_atomic_write_applies_the_mode_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    old_umask = os.umask(0o077)
    try:
        atomic_write(tmp_path / "key", b"secret", mode=mode)
        atomic_write(tmp_path / "by-writer", lambda tmp: tmp.write_bytes(b"x"), mode=mode)
    finally:
        os.umask(old_umask)
    assert _mode(tmp_path / "key") == mode
    assert _mode(tmp_path / "by-writer") == mode
    assert (tmp_path / "key").read_bytes() == b"secret"


def test_a_write_failing_midway_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.json"
    atomic_write(path, b"old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise KeyboardInterrupt  # not an OSError: still cleaned up

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_a_failed_rename_keeps_the_old_file_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "anchor"
    atomic_write(path, b"old")
    seen: list[Path] = []

    def broken_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(Path(src))
        assert Path(src).read_bytes() == b"new"  # complete before the rename
        raise OSError("disk gone")

    monkeypatch.setattr(durable.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].parent == tmp_path and not seen[0].exists()
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["anchor"]


def test_the_folder_is_fsynced_unless_told_not_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        durable, "fsync_directory", lambda d, *, strict=False: calls.append((str(d), strict))
    )
    atomic_write(tmp_path / "a", b"1")
    atomic_write(tmp_path / "b", b"2", strict_dir=True)
    atomic_write(tmp_path / "c", b"3", fsync_dir=False)
    assert calls == [(str(tmp_path), False), (str(tmp_path), True)]


def test_write_temporary_names_and_keeps_the_temporary_next_to_the_target(
    tmp_path: Path,
) -> None:
    target = tmp_path / "ca.key"
    tmp = write_temporary(target, b"pem", mode=0o600)
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".ca.key.") and tmp.name.endswith(".tmp")
    assert tmp.read_bytes() == b"pem" and _mode(tmp) == 0o600
    assert not target.exists()
    other = write_temporary(target, "x", prefix=".tmp-ab-", suffix=".safetensors")
    assert other.name.startswith(".tmp-ab-") and other.name.endswith(".safetensors")
    assert other.read_text() == "x"


def test_write_temporary_removes_its_file_when_the_writer_fails(tmp_path: Path) -> None:
    def fails(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError, match="cannot serialise"):
        write_temporary(tmp_path / "x", fails)
    assert list(tmp_path.iterdir()) == []


def test_write_synced_creates_and_truncates(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_synced(path, b"a long first version")
    write_synced(path, "short")
    assert path.read_bytes() == b"short"


def test_fsync_directory_is_best_effort_unless_strict(tmp_path: Path) -> None:
    fsync_directory(tmp_path)
    fsync_directory(tmp_path / "missing")  # skipped
    with pytest.raises(FileNotFoundError):
        fsync_directory(tmp_path / "missing", strict=True)


# ---------------------------------------------------------------------- file locks
def test_an_exclusive_lock_excludes_other_processes_until_released(tmp_path: Path) -> None:
    path = tmp_path / "train.lock"
    with file_lock(path) as fd:
        assert isinstance(fd, int)
        assert _mode(path) == 0o600
        assert _try_lock_elsewhere(path, "ex") == "blocked"
        assert _try_lock_elsewhere(path, "sh") == "blocked"
    assert _try_lock_elsewhere(path, "ex") == "acquired"


def test_shared_locks_admit_readers_but_not_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json.lock"
    with file_lock(path, exclusive=False):
        assert _try_lock_elsewhere(path, "sh") == "acquired"
        assert _try_lock_elsewhere(path, "ex") == "blocked"


def test_a_second_exclusive_lock_in_another_thread_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / ".registry.lock"
    events: list[str] = []
    started = threading.Event()

    def second() -> None:
        started.set()
        with file_lock(path):
            events.append("second acquired")

    with file_lock(path):
        thread = threading.Thread(target=second)
        thread.start()
        assert started.wait(10)
        time.sleep(0.2)  # the thread is now waiting on the lock
        events.append("first released")
    thread.join(10)
    assert not thread.is_alive()
    assert events == ["first released", "second acquired"]


def test_a_lock_with_a_timeout_gives_up(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    with file_lock(path):
        start = time.monotonic()
        with pytest.raises(TimeoutError), file_lock(path, timeout_s=0.1):
            pytest.fail("acquired a lock held by another open file")
        assert time.monotonic() - start >= 0.1
    with file_lock(path, timeout_s=0.1) as fd:  # free again
        assert fd >= 0


def test_locking_an_open_file_leaves_it_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with open(path, "ab", buffering=0) as out:
        with file_lock(out.fileno()) as fd:
            assert fd == out.fileno()
            assert _try_lock_elsewhere(path, "ex") == "blocked"
        assert _try_lock_elsewhere(path, "ex") == "acquired"
        out.write(b"still open\n")
    assert path.read_bytes() == b"still open\n"
