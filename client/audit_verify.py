"""Verification of a whole audit log: every line, the chain, the signatures, the anchor.

:func:`verify_chain` walks the log's lines once, checking each entry's JSON, fields, hash,
link to the previous entry, ``seq`` and signature, then checks the log against its anchor
(a truncated, deleted or rewritten log), and finds the last privacy-ledger anchor on the
way. See :mod:`client.audit` for the whole scheme and its threat model.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from client.audit_format import (
    GENESIS_HASH,
    LEDGER_EVENT,
    RESTORE,
    AuditAnchor,
    AuditEntry,
    entry_mac,
    ledger_head,
    parse_line,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :meth:`client.audit.AuditLog.verify`.

    Attributes
    ----------
    ok
        ``True`` when every line is a valid, correctly chained entry.
    entries
        Number of valid entries before the first broken line (all of them when ``ok``).
    first_broken
        1-based line number of the first broken line, ``None`` when ``ok``.
    reason
        Why that line is broken, starting with ``"line N: "``; ``None`` when ``ok``. A log
        shorter than its anchor is broken at the first missing line (``entries + 1``).
    unsigned
        Number of valid entries without a signature (written before signing existed): their
        integrity rests on the hash chain alone.
    """

    ok: bool
    entries: int
    first_broken: int | None
    reason: str | None
    unsigned: int = 0


class LogFiles(Protocol):
    """The files of one audit log, named in the reasons a log is broken."""

    path: Path
    key_path: Path
    anchor_path: Path


@dataclass(frozen=True)
class _Break:
    """Where and why a log is broken: its first broken line, the valid entries before it."""

    line: int
    entries: int
    reason: str


@dataclass
class _Walk:
    """What a walk over the log's lines has found so far."""

    count: int = 0
    unsigned: int = 0
    prev_hash: str = GENESIS_HASH
    first_signed: int | None = None
    head_at_anchor: str = GENESIS_HASH
    ledger: tuple[int, str] | None = None


def broken_log(
    path: Path, line: int, entries: int, reason: str, unsigned: int = 0
) -> AuditVerification:
    """The verification of a log broken at ``line`` (logged as a warning).

    Parameters
    ----------
    path
        The log file.
    line, entries, reason
        The first broken line (1-based), the number of valid entries before it and why.
    unsigned
        Number of valid unsigned entries before it.
    """
    logger.warning("audit log %s broken: %s", path, reason)
    return AuditVerification(False, entries, line, reason, unsigned)


def verify_chain(
    lines: Iterable[bytes] | None,
    *,
    key: bytes | None,
    anchor: AuditAnchor | None,
    anchor_problem: str | None,
    files: LogFiles,
) -> tuple[AuditVerification, tuple[int, str] | None]:
    """Verify a log's lines against each other, the key and the anchor.

    Parameters
    ----------
    lines
        The log's lines, newlines included; ``None`` when the log file does not exist.
    key
        The site key, ``None`` when its file does not exist.
    anchor
        The verified anchor, ``None`` when it does not exist or could not be read.
    anchor_problem
        Why the anchor could not be read (it is then ``None``).
    files
        The log's files, named in the reasons.

    Returns
    -------
    verification
        See :meth:`client.audit.AuditLog.verify`.
    ledger
        ``(count, head)`` of the last privacy-ledger anchor entry; ``None`` when there is
        none or the log is broken.
    """
    walk = _Walk()
    problem = _walk_lines(lines or (), walk, key=key, anchor=anchor)
    if problem is None:
        problem = _final_problem(
            walk,
            key=key,
            anchor=anchor,
            anchor_problem=anchor_problem,
            log_missing=lines is None,
            files=files,
        )
    if problem is not None:
        return broken_log(
            files.path, problem.line, problem.entries, problem.reason, walk.unsigned
        ), None
    return AuditVerification(True, walk.count, None, None, walk.unsigned), walk.ledger


def _walk_lines(
    lines: Iterable[bytes], walk: _Walk, *, key: bytes | None, anchor: AuditAnchor | None
) -> _Break | None:
    """Check every line in order, updating ``walk``; the first broken line, if any."""
    signed_from = None if anchor is None else anchor.signed_from
    for lineno, raw in enumerate(lines, start=1):
        entry, reason = check_line(raw, lineno, prev_hash=walk.prev_hash, seq=walk.count)
        if entry is None:
            return _Break(lineno, walk.count, str(reason))
        reason = _signature_problem(entry, lineno, walk, key=key, signed_from=signed_from)
        if reason is not None:
            return _Break(lineno, walk.count, reason)
        walk.prev_hash = entry.hash
        walk.count += 1
        if anchor is not None and walk.count == anchor.count:
            walk.head_at_anchor = entry.hash
    return None


def _signature_problem(
    entry: AuditEntry, lineno: int, walk: _Walk, *, key: bytes | None, signed_from: int | None
) -> str | None:
    """Why a well-chained entry's signature (or ledger record) is wrong; ``None`` if fine.

    Counts the unsigned entries, the first signed line and the last ledger anchor in ``walk``.
    """
    if entry.mac is None:
        if walk.first_signed is not None:
            return (
                f"line {lineno}: no signature after signed entries (signature "
                "stripped and chain recomputed?)"
            )
        if signed_from is not None and entry.seq >= signed_from:
            return (
                f"line {lineno}: no signature, but the anchor says entries from "
                f"seq {signed_from} on are signed (signature stripped?)"
            )
        walk.unsigned += 1
        return None
    walk.first_signed = walk.first_signed or lineno
    if key is not None and not hmac.compare_digest(entry.mac, entry_mac(key, entry.to_dict())):
        return (
            f"line {lineno}: signature does not match (entry edited or the "
            "chain recomputed without the site key)"
        )
    if entry.event == LEDGER_EVENT:
        walk.ledger = ledger_head(entry.record)
        if walk.ledger is None:
            return f"line {lineno}: malformed ledger anchor record"
    return None


def _final_problem(
    walk: _Walk,
    *,
    key: bytes | None,
    anchor: AuditAnchor | None,
    anchor_problem: str | None,
    log_missing: bool,
    files: LogFiles,
) -> _Break | None:
    """Why a log whose every line is valid is still broken (key, anchor); ``None`` if not."""
    count, first_signed = walk.count, walk.first_signed
    if first_signed is not None and key is None:
        return _Break(
            first_signed,
            first_signed - 1,
            f"line {first_signed}: the entry is signed but the site key {files.key_path} is "
            f"missing, so no signature can be checked; {RESTORE}",
        )
    if anchor_problem is not None:
        return _Break(count + 1, count, f"line {count + 1}: {anchor_problem}")
    if anchor is None:
        if first_signed is not None or key is not None:
            return _Break(
                count + 1,
                count,
                f"line {count + 1}: the audit anchor {files.anchor_path} is missing "
                f"(deleted?) although the site key {files.key_path} exists, so a truncation "
                f"of the log ({count} entries found) cannot be ruled out; {RESTORE}",
            )
        return None
    if count < anchor.count:
        return _Break(count + 1, count, _short_log(count, anchor, log_missing, files))
    if walk.head_at_anchor != anchor.head:
        return _Break(
            anchor.count,
            anchor.count - 1,
            f"line {anchor.count}: the entry's hash is not the head its anchor "
            f"{files.anchor_path} records (log rewritten or replaced); {RESTORE}",
        )
    return None


def _short_log(count: int, anchor: AuditAnchor, log_missing: bool, files: LogFiles) -> str:
    """Why a log of ``count`` entries, fewer than its anchor records, is broken."""
    if log_missing:
        return (
            f"line 1: the audit log {files.path} is missing (deleted?) but its anchor "
            f"{files.anchor_path} records {anchor.count} entries; {RESTORE}"
        )
    return (
        f"line {count + 1}: the log ends after {count} entries but its anchor "
        f"{files.anchor_path} records {anchor.count} (expected {anchor.count}, "
        f"found {count}): the last {anchor.count - count} entries were removed "
        f"(truncated) or the log was replaced; {RESTORE}"
    )


def check_line(
    raw: bytes, lineno: int, *, prev_hash: str, seq: int
) -> tuple[AuditEntry, None] | tuple[None, str]:
    """The entry on line ``lineno`` if it is a valid next entry, else why it is broken."""
    if not raw.endswith(b"\n"):
        try:
            json.loads(raw)
        except ValueError:
            return None, f"line {lineno}: not valid JSON (truncated?)"
        return None, f"line {lineno}: not terminated by a newline (truncated?)"
    try:
        entry = parse_line(raw[:-1], lineno)
    except ValueError as e:
        return None, str(e)
    if entry.computed_hash() != entry.hash:
        return None, f"line {lineno}: hash mismatch (entry edited)"
    if entry.prev != prev_hash:
        if lineno == 1:
            return None, "line 1: prev is not the genesis hash (entries removed from the start)"
        return None, (
            f"line {lineno}: prev does not match line {lineno - 1}'s hash "
            "(entry removed or reordered)"
        )
    if entry.seq != seq:
        return None, (
            f"line {lineno}: seq is {entry.seq}, expected {seq} (entry removed or reordered)"
        )
    return entry, None
