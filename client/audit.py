"""Append-only, hash-chained, signed and anchored audit log of every request a site served.

The log is a JSON Lines file (``<state-dir>/audit.jsonl``). Each line is one
:class:`AuditEntry` with the fields ``seq`` (0, 1, ...), ``time`` (ISO-8601 UTC),
``prev`` (the previous entry's ``hash``; 64 zeros for the first entry), ``event`` (e.g.
``"train"``, ``"evaluate"``, ``"query"``, ``"refused"``, ``"ledger"``), ``record`` (free JSON
data: run id, stage, round, model hash received, components returned, examples, epsilon
spent, metrics), ``mac`` and ``hash``.

* ``mac`` is the HMAC-SHA256, under the site's secret key, of the canonical JSON (see
  :func:`canonical_json`) of ``seq``, ``time``, ``prev``, ``event`` and ``record``. The key
  is 32 random bytes from :mod:`secrets`, created at the first append in
  ``<state-dir>/keys/audit.key`` (file 0600, folder 0700), apart from the log.
* ``hash`` is the sha256 of the canonical JSON of every other field (``mac`` included).
  Editing, removing, reordering entries therefore breaks the chain, and recomputing the chain
  after an edit needs the key.
* The **anchor** ``<state-dir>/audit.anchor`` (JSON, 0600, rewritten atomically after every
  append and HMAC-signed with the same key) records the entry count and the last hash, so a
  clean truncation of the tail (which leaves a valid chain) or a deleted log is detected.

:meth:`AuditLog.verify` reports the first broken line, or the count found against the count
the anchor expects. Appending reads only the last line (to continue ``seq`` and ``prev``),
checks it against the anchor, holds an exclusive ``fcntl.flock`` on the file (a site may run
one ClientApp process per message) and fsyncs. Every state file is 0600, every folder this
module creates is 0700.

Entries written before signing existed (no ``mac``) are accepted by their chain alone and
counted as ``unsigned`` in :class:`AuditVerification`; once one entry is signed, every later
entry must be signed (the anchor's ``signed_from`` says from which ``seq`` on).

Threat model
------------
This stops an operator or a careless process that truncates, deletes, edits or rewrites the
log (with a recomputed chain) or its anchor: :meth:`AuditLog.verify`, every append and the
site before it serves requests detect it and fail closed. The coordinator has no file access
and cannot touch the log at all. It does NOT stop someone who can read the key file: with the
key they can forge a consistent log and anchor. Nor does it stop a rollback of the log, the
anchor (and the privacy ledger) together to an older copy of all of them, or the deletion of
the whole state (log, anchor and key), which looks like a brand-new site; stripping every
signature and deleting the key and anchor makes the log look like an old unsigned log
(``unsigned`` equals ``entries``). Keep backups of the state directory off the machine.

Modules
-------
This module appends to the log; the formats (entries, anchor, canonical JSON, MACs) are in
:mod:`client.audit_format`, the key, anchor and tail files in :mod:`client.audit_files` and
the verification of a whole log in :mod:`client.audit_verify`. Their public names are
importable from here.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from client.audit_files import (
    create_key,
    load_key,
    read_anchor,
    restrict,
    tail_entry,
    write_anchor,
)
from client.audit_format import (
    ANCHOR_VERSION,
    DIR_MODE,
    ENTRY_FIELDS,
    FILE_MODE,
    FIX,
    GENESIS_HASH,
    KEY_BYTES,
    LEDGER_EVENT,
    RESTORE,
    AuditAnchor,
    AuditEntry,
    canonical_json,
    entry_hash,
    entry_mac,
    parse_line,
    to_jsonable,
)
from client.audit_verify import AuditVerification, broken_log, verify_chain
from client.errors import AuditError
from unicon_model.durable import file_lock, fsync_directory

__all__ = [
    "ANCHOR_VERSION",
    "DIR_MODE",
    "ENTRY_FIELDS",
    "FILE_MODE",
    "GENESIS_HASH",
    "KEY_BYTES",
    "LEDGER_EVENT",
    "AuditAnchor",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "canonical_json",
    "entry_hash",
    "entry_mac",
    "to_jsonable",
]

logger = logging.getLogger(__name__)


class AuditLog:
    """Append-only, hash-chained, signed and anchored JSONL audit log of one site.

    Parameters
    ----------
    path
        The log file, usually ``<state-dir>/audit.jsonl``; created (0600) on the first append.
    key_path
        The site's secret key, kept apart from the log; default
        ``<log folder>/keys/<log name without suffix>.key`` (``keys/audit.key``). Created
        (0600, in a new 0700 folder) by the first append to a log that has neither a signed
        entry nor an anchor. Anyone who can read it can forge entries: back it up with the
        state directory, never share it.
    anchor_path
        The signed anchor (count and head of the log); default the log's path with the
        suffix ``.anchor`` (``<state-dir>/audit.anchor``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        key_path: str | Path | None = None,
        anchor_path: str | Path | None = None,
    ) -> None:
        self.path = Path(path)
        self.key_path = (
            Path(key_path)
            if key_path is not None
            else self.path.parent / "keys" / f"{self.path.stem}.key"
        )
        self.anchor_path = (
            Path(anchor_path) if anchor_path is not None else self.path.with_suffix(".anchor")
        )

    def append(self, event: str, record: Mapping[str, Any]) -> AuditEntry:
        """Append one signed entry after the current last one, under an exclusive file lock.

        The last entry is first checked against the anchor (same count and hash, or a
        verified signed tail after a crash between an append and its anchor update); the
        anchor is rewritten after the entry is fsynced.

        Parameters
        ----------
        event
            Kind of request served (``"train"``, ``"evaluate"``, ``"query"``, ``"refused"``).
        record
            Data about the request; numpy scalars are converted, NaN/Inf refused.

        Returns
        -------
        AuditEntry
            The entry written (and fsynced).

        Raises
        ------
        ValueError
            ``event`` is empty.
        AuditError
            ``record`` is not JSON-able; the last line of the log is corrupt; the log was
            truncated, deleted or rewritten (it disagrees with its anchor); the key or the
            anchor is missing or corrupt; or a file cannot be written. Nothing is appended
            then.
        """
        if not isinstance(event, str) or not event:
            raise ValueError("audit event must be a non-empty string such as 'train'")
        if not isinstance(record, Mapping):
            raise AuditError(f"audit record must be a mapping, got {type(record).__name__}")
        body = to_jsonable(record, field="record")
        created = not self.path.exists()
        if created and self.anchor_path.exists():
            raise AuditError(
                f"the audit log {self.path} is missing (deleted?) but its anchor "
                f"{self.anchor_path} exists; refusing to start a new log: {RESTORE}"
            )
        try:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            with open(fd, "ab", buffering=0) as out, file_lock(out.fileno()):
                restrict(out.fileno(), self.path)
                entry = self._append_locked(out, event, body)
            if created:
                fsync_directory(self.path.parent)
        except OSError as e:
            raise AuditError(f"cannot append to the audit log {self.path}: {e}") from e
        logger.debug("audit %s seq=%d %s", self.path, entry.seq, event)
        return entry

    def _append_locked(self, out: BinaryIO, event: str, body: Any) -> AuditEntry:
        """Check the tail against the anchor, write one entry, update the anchor."""
        last = tail_entry(self.path)
        key = load_key(self.key_path)
        anchor = read_anchor(self.anchor_path, self.key_path, key)
        if key is None:
            if last is not None and last.mac is not None:
                raise AuditError(
                    f"the audit log {self.path} holds signed entries but the site key "
                    f"{self.key_path} is missing; refusing to append: {RESTORE}"
                )
            key = create_key(self.key_path)
            signed_from = 0 if last is None else last.seq + 1
        elif anchor is None:
            raise AuditError(
                f"the audit anchor {self.anchor_path} is missing (deleted?) although the site "
                f"key {self.key_path} exists; refusing to append: {RESTORE}"
            )
        else:
            self._check_tail(last, anchor, key)
            signed_from = anchor.signed_from
        fields: dict[str, Any] = {
            "seq": 0 if last is None else last.seq + 1,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"),
            "prev": GENESIS_HASH if last is None else last.hash,
            "event": event,
            "record": body,
        }
        fields["mac"] = entry_mac(key, fields)
        entry = AuditEntry(**fields, hash=entry_hash(fields))
        size = os.fstat(out.fileno()).st_size
        try:
            data = memoryview(canonical_json(entry.to_dict()) + b"\n")
            while data:
                data = data[out.write(data) or 0 :]
            os.fsync(out.fileno())
        except OSError:
            os.ftruncate(out.fileno(), size)  # never leave a partial line
            raise
        try:
            write_anchor(self.anchor_path, key, AuditAnchor(entry.seq + 1, entry.hash, signed_from))
        except OSError as e:
            raise AuditError(
                f"entry seq {entry.seq} was appended to the audit log {self.path} but its "
                f"anchor {self.anchor_path} could not be updated ({e}); the next append "
                "repairs the anchor"
            ) from e
        return entry

    def _check_tail(self, last: AuditEntry | None, anchor: AuditAnchor, key: bytes) -> None:
        """Raise unless the log's last entry agrees with the anchor (cheap check per append)."""
        found = 0 if last is None else last.seq + 1
        refuse = f"refusing to append: {RESTORE}"
        if last is not None and last.mac is None and last.seq >= anchor.signed_from:
            raise AuditError(
                f"the last entry of the audit log {self.path} (seq {last.seq}) has no "
                f"signature although entries from seq {anchor.signed_from} on are signed; "
                f"{refuse}"
            )
        if (
            last is not None
            and last.mac is not None
            and not hmac.compare_digest(last.mac, entry_mac(key, last.to_dict()))
        ):
            raise AuditError(
                f"the last entry of the audit log {self.path} (seq {last.seq}) is not "
                f"signed by the site key (rewritten?); {refuse}"
            )
        if found < anchor.count:
            raise AuditError(
                f"the audit log {self.path} holds {found} entries but its anchor "
                f"{self.anchor_path} records {anchor.count}: entries were removed from the end "
                f"(truncated) or the log was replaced; {refuse}"
            )
        if found == anchor.count:
            head = GENESIS_HASH if last is None else last.hash
            if head != anchor.head:
                raise AuditError(
                    f"the last entry of the audit log {self.path} (seq {found - 1}) is not the "
                    f"one its anchor {self.anchor_path} records (log rewritten or replaced); "
                    f"{refuse}"
                )
            return
        # more entries than anchored: a crash between an append and its anchor update
        result, _ = self._walk(lock=False)
        if not result.ok:
            raise AuditError(
                f"the audit log {self.path} is broken at line {result.first_broken} "
                f"({result.reason}); refusing to append: {FIX}"
            )

    def entries(self) -> Iterator[AuditEntry]:
        """Entries of the log in order (parsed, not verified: use :meth:`verify`).

        Yields
        ------
        AuditEntry
            One per line; nothing for a missing or empty log.

        Raises
        ------
        AuditError
            A line is not a well-formed entry.
        """
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield parse_line(raw.rstrip(b"\n"), lineno)
                except ValueError as e:
                    raise AuditError(f"audit log {self.path}, {e}: {FIX}") from e

    def verify(self) -> AuditVerification:
        """Check every line (JSON, fields, hash, link, ``seq``, signature) and the anchor.

        Returns
        -------
        AuditVerification
            ``ok`` with the number of entries (and how many are unsigned), or the first
            broken line and why. Beyond broken lines, the log is broken when it is shorter
            than its anchor records (truncated: the reason says the count expected and the
            count found) or deleted, when the entry at the anchor's count has another hash
            (rewritten), when the anchor is missing although the key or signed entries exist,
            corrupt or not signed by the key, and when signed entries exist but the key is
            missing or corrupt. A missing log with no anchor and no key (a brand-new site)
            verifies as ``ok`` with 0 entries.
        """
        return self._walk()[0]

    def ledger_anchor(self) -> tuple[int, str] | None:
        """Verify the log; the last privacy-ledger anchor it holds.

        Returns
        -------
        tuple[int, str] | None
            ``(count, head)`` of the last :data:`LEDGER_EVENT` entry, ``None`` when the log
            has none (a new site, or a ledger that was never anchored).

        Raises
        ------
        AuditError
            The log is broken (see :meth:`verify`).
        """
        result, ledger = self._walk()
        if not result.ok:
            raise AuditError(
                f"the audit log {self.path} is broken at line {result.first_broken}: "
                f"{result.reason}. The privacy ledger cannot be checked against it, so the site "
                f"refuses to serve requests: {FIX}"
            )
        return ledger

    def anchor_ledger(self, count: int, head: str, *, ledger: str | Path, request: str) -> None:
        """Append a :data:`LEDGER_EVENT` entry recording the privacy ledger's count and head.

        Parameters
        ----------
        count, head
            Number of ledger entries and the hash-chain head over them.
        ledger
            The ledger file (recorded for people; not compared).
        request
            The request whose spending was just recorded.
        """
        self.append(
            LEDGER_EVENT, {"ledger": str(ledger), "count": count, "head": head, "request": request}
        )

    @contextlib.contextmanager
    def _reader(self, *, lock: bool) -> Iterator[BinaryIO | None]:
        """The log opened for reading (shared lock if ``lock``), ``None`` when missing."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            f = None
        if f is None:
            yield None
            return
        with f, file_lock(f.fileno(), exclusive=False) if lock else contextlib.nullcontext():
            yield f

    def _walk(self, *, lock: bool = True) -> tuple[AuditVerification, tuple[int, str] | None]:
        """Verify the log (see :meth:`verify`) and find its last privacy-ledger anchor."""
        with self._reader(lock=lock) as f:
            try:  # under the lock: the first append creates the key and the anchor
                key = load_key(self.key_path)
            except AuditError as e:
                reason = f"line 1: signatures cannot be checked: {e}"
                return broken_log(self.path, 1, 0, reason), None
            anchor_problem: str | None = None
            try:
                anchor = read_anchor(self.anchor_path, self.key_path, key)
            except AuditError as e:
                anchor, anchor_problem = None, str(e)
            return verify_chain(
                f, key=key, anchor=anchor, anchor_problem=anchor_problem, files=self
            )
