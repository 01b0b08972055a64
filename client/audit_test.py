"""Tests of the hash-chained audit log: chain, tamper detection, restart, two processes."""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.audit import GENESIS_HASH, AuditLog, AuditVerification
from client.errors import AuditError


def write_chain(path: Path, n: int) -> list[dict[str, Any]]:
    log = AuditLog(path)
    for i in range(n):
        log.append("train", {"run": "r1", "round": i, "n_examples": 10 * i, "loss": 0.5 / (i + 1)})
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def lines_of(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def independent_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_chain_of_five_verifies_with_links_and_seq(tmp_path: Path) -> None:
    # Prepare / Execute
    path = tmp_path / "audit.jsonl"
    entries = write_chain(path, 5)
    result = AuditLog(path).verify()
    # Assert
    assert result == AuditVerification(ok=True, entries=5, first_broken=None, reason=None)
    assert [e["seq"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0]["prev"] == "0" * 64 == GENESIS_HASH
    for i in range(1, 5):
        assert entries[i]["prev"] == entries[i - 1]["hash"]
    assert [e["record"]["round"] for e in entries] == [0, 1, 2, 3, 4]
    parsed = list(AuditLog(path).entries())
    assert [e.hash for e in parsed] == [e["hash"] for e in entries]
    assert parsed[2].record == {"run": "r1", "round": 2, "n_examples": 20, "loss": 0.5 / 3}
    stamp = datetime.fromisoformat(entries[0]["time"])
    assert stamp.utcoffset() == UTC.utcoffset(None)


def test_hash_equals_independent_sha256_of_canonical_json(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path / "audit.jsonl")
    record = {"zeta": "é ü", "alpha": [1, 2.5], "model": "ab" * 32, "eps": np.float32(0.25)}
    # Execute
    entry = log.append("query", record)
    # Assert
    expected_body = {
        "seq": 0,
        "time": entry.time,
        "prev": "0" * 64,
        "event": "query",
        "record": {"zeta": "é ü", "alpha": [1, 2.5], "model": "ab" * 32, "eps": 0.25},
    }
    key = bytes.fromhex((tmp_path / "keys" / "audit.key").read_text())
    signed = json.dumps(expected_body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    expected_mac = hmac.new(
        key, b"unicon-audit-entry-v1\n" + signed.encode("utf-8"), hashlib.sha256
    ).hexdigest()
    assert entry.mac == expected_mac
    assert entry.hash == independent_hash({**expected_body, "mac": expected_mac})
    on_disk = json.loads((tmp_path / "audit.jsonl").read_text(encoding="utf-8"))
    assert on_disk["hash"] == independent_hash(on_disk) == entry.hash
    assert "é ü" in (tmp_path / "audit.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False


def test_numpy_values_converted_and_nan_refused_naming_field(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path / "audit.jsonl")
    # Execute
    entry = log.append(
        "evaluate",
        {"n": np.int64(7), "ok": np.bool_(True), "m": {"auc": np.float64(0.875)}, "v": (1, 2)},
    )
    # Assert
    assert entry.record == {"n": 7, "ok": True, "m": {"auc": 0.875}, "v": [1, 2]}
    assert type(entry.record["n"]) is int
    assert type(entry.record["ok"]) is bool
    with pytest.raises(AuditError, match=r"record\.metrics\.auc"):
        log.append("evaluate", {"metrics": {"auc": float("nan")}})
    with pytest.raises(AuditError, match=r"record\.eps"):
        log.append("train", {"eps": np.float32(np.inf)})
    assert len(lines_of(tmp_path / "audit.jsonl")) == 1  # nothing written by refused appends


def test_edited_value_in_entry_three_reports_hash_mismatch(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    entries = write_chain(path, 5)
    entries[2]["record"]["n_examples"] = 999
    lines = lines_of(path)
    lines[2] = json.dumps(entries[2]) + "\n"
    path.write_text("".join(lines), encoding="utf-8")
    # Execute
    result = AuditLog(path).verify()
    # Assert
    assert result.ok is False
    assert result.first_broken == 3
    assert result.entries == 2
    assert result.reason == "line 3: hash mismatch (entry edited)"


def test_deleted_line_two_reports_broken_prev_link(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5)
    lines = lines_of(path)
    del lines[1]
    path.write_text("".join(lines), encoding="utf-8")
    # Execute
    result = AuditLog(path).verify()
    # Assert
    assert (result.ok, result.first_broken, result.entries) == (False, 2, 1)
    assert result.reason == "line 2: prev does not match line 1's hash (entry removed or reordered)"


def test_deleted_first_line_and_swapped_lines_detected(tmp_path: Path) -> None:
    # Prepare
    first = tmp_path / "first.jsonl"
    swapped = tmp_path / "swapped.jsonl"
    write_chain(first, 3)
    write_chain(swapped, 4)
    first.write_text("".join(lines_of(first)[1:]), encoding="utf-8")
    s = lines_of(swapped)
    swapped.write_text(s[0] + s[2] + s[1] + s[3], encoding="utf-8")
    # Execute
    r_first = AuditLog(first).verify()
    r_swapped = AuditLog(swapped).verify()
    # Assert
    assert (r_first.first_broken, r_first.entries) == (1, 0)
    assert r_first.reason is not None and "entries removed from the start" in r_first.reason
    assert (r_swapped.first_broken, r_swapped.entries) == (2, 1)
    assert r_swapped.reason is not None and "prev does not match line 1's hash" in r_swapped.reason


def test_truncated_last_line_detected_and_append_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_chain(path, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    # Execute
    result = AuditLog(path).verify()
    # Assert
    assert (result.ok, result.first_broken, result.entries) == (False, 4, 3)
    assert result.reason == "line 4: not valid JSON (truncated?)"
    with pytest.raises(AuditError, match="unicon site audit"):
        AuditLog(path).append("train", {"round": 4})
    assert path.read_bytes() == data[:-20]


def test_corrupt_complete_tail_line_refuses_append(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    entries = write_chain(path, 3)
    entries[2]["event"] = "evaluate"
    lines = lines_of(path)
    path.write_text("".join(lines[:2]) + json.dumps(entries[2]) + "\n", encoding="utf-8")
    before = path.read_bytes()
    # Execute / Assert
    with pytest.raises(AuditError, match=r"seq 2.*unicon site audit"):
        AuditLog(path).append("train", {})
    assert path.read_bytes() == before


def test_new_instance_continues_seq_and_prev_after_restart(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "state" / "audit.jsonl"
    entries = write_chain(path, 3)
    # Execute
    restarted = AuditLog(path)
    entry = restarted.append("refused", {"reason": "budget"})
    # Assert
    assert entry.seq == 3
    assert entry.prev == entries[2]["hash"]
    assert AuditLog(path).verify() == AuditVerification(
        ok=True, entries=4, first_broken=None, reason=None
    )


def test_tail_read_handles_lines_longer_than_one_chunk(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    first = log.append("train", {"blob": "x" * 200_000})
    # Execute
    second = AuditLog(path).append("train", {"blob": "y" * 150_000})
    third = AuditLog(path).append("train", {})
    # Assert
    assert (second.seq, second.prev) == (1, first.hash)
    assert (third.seq, third.prev) == (2, second.hash)
    assert AuditLog(path).verify().entries == 3


def _append_many(path: str, worker: int, count: int, barrier: Any) -> None:
    barrier.wait()
    log = AuditLog(Path(path))
    for i in range(count):
        log.append("train", {"worker": worker, "i": i})


def test_two_processes_appending_produce_one_valid_chain(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 20, barrier)) for w in range(2)]
    # Execute
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    # Assert
    assert [p.exitcode for p in procs] == [0, 0]
    result = AuditLog(path).verify()
    assert result == AuditVerification(ok=True, entries=40, first_broken=None, reason=None)
    records = [e.record for e in AuditLog(path).entries()]
    for w in range(2):
        assert [r["i"] for r in records if r["worker"] == w] == list(range(20))


# ---------------------------------------------------------------- signing and the anchor


def recompute_chain(entries: list[dict[str, Any]]) -> str:
    """Rewrite every hash/prev as an attacker without the key would; the log's text."""
    prev = GENESIS_HASH
    out = []
    for entry in entries:
        entry = {**entry, "prev": prev}
        entry["hash"] = independent_hash(entry)
        prev = entry["hash"]
        out.append(json.dumps(entry) + "\n")
    return "".join(out)


def test_clean_tail_truncation_is_detected_against_the_anchor(tmp_path: Path) -> None:
    # Prepare: five entries, then the last line removed (the chain stays valid)
    path = tmp_path / "audit.jsonl"
    write_chain(path, 5)
    path.write_text("".join(lines_of(path)[:4]), encoding="utf-8")
    truncated = path.read_bytes()
    # Execute
    result = AuditLog(path).verify()
    # Assert: it names the count expected and found; appending is refused, nothing written
    assert (result.ok, result.entries, result.first_broken) == (False, 4, 5)
    assert result.reason is not None
    assert "expected 5, found 4" in result.reason and "audit.anchor" in result.reason
    assert "truncated" in result.reason
    with pytest.raises(AuditError, match=r"holds 4 entries but its anchor .* records 5"):
        AuditLog(path).append("train", {})
    assert path.read_bytes() == truncated


def test_deleted_log_is_detected_and_not_silently_restarted(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_chain(path, 3)
    path.unlink()
    # Execute
    result = AuditLog(path).verify()
    # Assert
    assert (result.ok, result.entries, result.first_broken) == (False, 0, 1)
    assert result.reason is not None and "is missing (deleted?)" in result.reason
    assert "records 3 entries" in result.reason
    with pytest.raises(AuditError, match=r"is missing .* anchor"):
        AuditLog(path).append("train", {})
    assert not path.exists()


def test_chain_recomputed_without_the_key_is_detected(tmp_path: Path) -> None:
    # Prepare: entry 2 edited, then every hash and link recomputed (macs kept)
    path = tmp_path / "audit.jsonl"
    entries = write_chain(path, 4)
    entries[1]["record"]["n_examples"] = 999
    path.write_text(recompute_chain(entries), encoding="utf-8")
    # Execute
    result = AuditLog(path).verify()
    # Assert
    assert (result.ok, result.first_broken, result.entries) == (False, 2, 1)
    assert result.reason == (
        "line 2: signature does not match (entry edited or the chain recomputed without the "
        "site key)"
    )


def test_stripped_signatures_are_detected_even_without_the_anchor(tmp_path: Path) -> None:
    # Prepare: every mac removed and the chain recomputed (looks like an old unsigned log)
    path = tmp_path / "audit.jsonl"
    entries = write_chain(path, 3)
    path.write_text(
        recompute_chain([{k: v for k, v in e.items() if k != "mac"} for e in entries]),
        encoding="utf-8",
    )
    # Execute / Assert: the anchor says entries are signed from seq 0
    result = AuditLog(path).verify()
    assert (result.ok, result.first_broken) == (False, 1)
    assert result.reason is not None and "from seq 0 on are signed" in result.reason
    # the anchor deleted too: the key still exists, so the missing anchor is reported
    (tmp_path / "audit.anchor").unlink()
    result = AuditLog(path).verify()
    assert (result.ok, result.first_broken) == (False, 4)
    assert result.reason is not None and "audit.anchor is missing" in result.reason


def test_edited_anchor_and_missing_key_are_detected(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "audit.jsonl"
    write_chain(path, 2)
    anchor = tmp_path / "audit.anchor"
    original = anchor.read_text()
    # Execute / Assert: an anchor edited to match a shorter log is not signed by the key
    anchor.write_text(original.replace('"count":2', '"count":1'))
    result = AuditLog(path).verify()
    assert not result.ok and result.reason is not None
    assert "is not signed by the site key" in result.reason
    # a corrupt anchor names the file
    anchor.write_text("{")
    result = AuditLog(path).verify()
    assert result.reason is not None and f"anchor {anchor} is corrupt" in result.reason
    # a corrupt key names the file
    anchor.write_text(original)
    key = tmp_path / "keys" / "audit.key"
    saved = key.read_text()
    key.write_text("not hex")
    result = AuditLog(path).verify()
    assert result.reason is not None and f"audit key {key} is corrupt" in result.reason
    key.write_text(saved)
    assert AuditLog(path).verify().ok
    # a missing key: signatures cannot be checked
    key.unlink()
    result = AuditLog(path).verify()
    assert (result.ok, result.first_broken) == (False, 1)
    assert result.reason is not None and "site key" in result.reason and "missing" in result.reason
    with pytest.raises(AuditError, match="missing"):
        AuditLog(path).append("train", {})
    assert len(lines_of(path)) == 2


def test_anchor_left_behind_by_a_crash_is_accepted_and_repaired(tmp_path: Path) -> None:
    # Prepare: the anchor as it was before the third append (crash before its update)
    path = tmp_path / "audit.jsonl"
    write_chain(path, 2)
    anchor = tmp_path / "audit.anchor"
    before = anchor.read_bytes()
    AuditLog(path).append("train", {"round": 2})
    anchor.write_bytes(before)
    # Execute
    result = AuditLog(path).verify()
    entry = AuditLog(path).append("train", {"round": 3})
    # Assert: the signed extra entry is accepted, and the next append re-anchors
    assert result.ok and result.entries == 3
    assert entry.seq == 3
    assert json.loads(anchor.read_text())["count"] == 4
    assert AuditLog(path).verify().ok


def test_old_unsigned_log_verifies_as_unsigned_and_continues_signed(tmp_path: Path) -> None:
    # Prepare: a log written before signing (no mac, no key, no anchor), mode 0644
    path = tmp_path / "audit.jsonl"
    entries = write_chain(tmp_path / "old" / "audit.jsonl", 2)
    path.write_text(
        recompute_chain([{k: v for k, v in e.items() if k != "mac"} for e in entries]),
        encoding="utf-8",
    )
    path.chmod(0o644)
    # Execute
    before = AuditLog(path).verify()
    AuditLog(path).append("train", {"round": 2})
    after = AuditLog(path).verify()
    # Assert
    assert before == AuditVerification(True, 2, None, None, unsigned=2)
    assert after == AuditVerification(True, 3, None, None, unsigned=2)
    assert json.loads((tmp_path / "audit.anchor").read_text())["signed_from"] == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_state_files_are_0600_and_the_key_folder_0700(tmp_path: Path) -> None:
    # Prepare / Execute
    path = tmp_path / "state" / "audit.jsonl"
    AuditLog(path).append("train", {})
    # Assert
    for file in (path, tmp_path / "state" / "audit.anchor", tmp_path / "state/keys/audit.key"):
        assert stat.S_IMODE(os.stat(file).st_mode) == 0o600, file
    for folder in (tmp_path / "state", tmp_path / "state" / "keys"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700, folder
    assert len(bytes.fromhex((tmp_path / "state/keys/audit.key").read_text())) == 32
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "audit.anchor",
        "audit.jsonl",
        "keys",
    ]  # no temporary file left behind


def test_ledger_anchor_is_the_last_ledger_event(tmp_path: Path) -> None:
    # Prepare
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.ledger_anchor() is None
    log.anchor_ledger(1, "a" * 64, ledger="ledger.json", request="r/s/1/h")
    log.append("train", {})
    log.anchor_ledger(2, "b" * 64, ledger="ledger.json", request="r/s/2/h")
    # Execute / Assert
    assert log.ledger_anchor() == (2, "b" * 64)
    (tmp_path / "audit.jsonl").write_text("".join(lines_of(tmp_path / "audit.jsonl")[:2]))
    with pytest.raises(AuditError, match="expected 3, found 2"):
        log.ledger_anchor()


def test_an_append_fsyncs_the_entry_and_the_anchor_file_but_not_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two fsyncs per append (issue 16: the third, on the folder, was a steady-state cost);
    the entry is synced before the anchor, so after a power loss the anchor can only lag."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("query", {"i": 0})  # creates the key and the log (their folders are synced)
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    log.append("train", {"i": 1})
    assert len(synced) == 2
    assert synced[0] == str(tmp_path / "audit.jsonl")
    assert Path(synced[1]).parent == tmp_path and synced[1] != str(tmp_path)
    assert log.verify().ok
