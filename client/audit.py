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
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from client.errors import AuditError
from unicon_model.durable import atomic_write, file_lock, fsync_directory, write_temporary

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""The ``prev`` value of the first entry of a log."""

ENTRY_FIELDS = ("seq", "time", "prev", "event", "record", "hash")
"""Fields every line of the log has (``mac`` too, except in logs written before signing)."""

LEDGER_EVENT = "ledger"
"""Event anchoring the privacy ledger: its record holds the ledger's ``count`` and ``head``."""

KEY_BYTES = 32
"""Length of the site's audit key (random bytes from :mod:`secrets`)."""

ANCHOR_VERSION = 1
"""Format version of the anchor file."""

FILE_MODE = 0o600
"""Mode of the log, its anchor and its key."""

DIR_MODE = 0o700
"""Mode of the folders this module creates."""

_ENTRY_MAC_DOMAIN = b"unicon-audit-entry-v1\n"
_ANCHOR_MAC_DOMAIN = b"unicon-audit-anchor-v1\n"
_TAIL_CHUNK = 64 * 1024
_FIX = "run `unicon site audit` to find the broken entry"
_RESTORE = "restore the state directory (log, anchor and keys/) from a backup"


def canonical_json(value: Any) -> bytes:
    """Canonical UTF-8 JSON of ``value``: sorted keys, no whitespace, no NaN/Inf.

    Parameters
    ----------
    value
        JSON-able data (already passed through :func:`to_jsonable`).

    Returns
    -------
    bytes
        ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False)`` encoded as UTF-8.
    """
    text = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def entry_hash(fields: Mapping[str, Any]) -> str:
    """Sha256 hex of the canonical JSON of an entry's fields without ``hash``.

    Parameters
    ----------
    fields
        The entry's fields; a ``hash`` key, if present, is left out.

    Returns
    -------
    str
        64 lowercase hex characters.
    """
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def entry_mac(key: bytes, fields: Mapping[str, Any]) -> str:
    """HMAC-SHA256 hex, under ``key``, of an entry's fields without ``mac`` and ``hash``.

    Parameters
    ----------
    key
        The site's audit key (:data:`KEY_BYTES` bytes).
    fields
        The entry's fields; ``mac`` and ``hash``, if present, are left out.

    Returns
    -------
    str
        64 lowercase hex characters.
    """
    body = {k: v for k, v in fields.items() if k not in ("hash", "mac")}
    return hmac.new(key, _ENTRY_MAC_DOMAIN + canonical_json(body), hashlib.sha256).hexdigest()


def _anchor_mac(key: bytes, body: Mapping[str, Any]) -> str:
    return hmac.new(key, _ANCHOR_MAC_DOMAIN + canonical_json(body), hashlib.sha256).hexdigest()


def to_jsonable(value: Any, *, field: str = "record") -> Any:
    """Convert ``value`` to plain JSON data, or raise naming the field at fault.

    numpy scalars become Python scalars, numpy arrays and objects with ``tolist`` (e.g.
    tensors) become lists, tuples become lists. Non-finite floats (NaN, Inf) and values of
    other types are refused.

    Parameters
    ----------
    value
        The data to convert.
    field
        Dotted path of ``value`` used in error messages (e.g. ``record.metrics.auc``).

    Returns
    -------
    Any
        ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` or ``dict`` with
        ``str`` keys.

    Raises
    ------
    AuditError
        A float is NaN or infinite, a mapping key is not a string, or a value has a type
        that JSON cannot hold.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        return to_jsonable(value.item(), field=field)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError(
                f"audit field {field!r} is {value!r}; only finite numbers can be logged "
                "(record None or a string instead)"
            )
        return float(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(
                    f"audit field {field!r} has the key {key!r} of type "
                    f"{type(key).__name__}; keys must be strings"
                )
            out[key] = to_jsonable(item, field=f"{field}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item, field=f"{field}[{i}]") for i, item in enumerate(value)]
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return to_jsonable(tolist(), field=field)
    raise AuditError(
        f"audit field {field!r} has the type {type(value).__name__}, which cannot be "
        "written as JSON; convert it to a number, string, list or dict"
    )


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit log.

    Attributes
    ----------
    seq
        Position in the log, 0 for the first entry.
    time
        ISO-8601 UTC time of the append.
    prev
        ``hash`` of the previous entry, :data:`GENESIS_HASH` for the first.
    event
        Kind of request served (``"train"``, ``"evaluate"``, ``"query"``, ``"refused"``...).
    record
        JSON data describing the request and what was returned.
    hash
        Sha256 of the canonical JSON of the other fields (``mac`` included).
    mac
        HMAC-SHA256 of the entry under the site's key (:func:`entry_mac`); ``None`` for an
        entry written before signing existed.
    """

    seq: int
    time: str
    prev: str
    event: str
    record: dict[str, Any]
    hash: str
    mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Fields as a plain dictionary, as written to the log (no ``mac`` when unsigned)."""
        fields: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time,
            "prev": self.prev,
            "event": self.event,
            "record": self.record,
            "hash": self.hash,
        }
        if self.mac is not None:
            fields["mac"] = self.mac
        return fields

    def computed_hash(self) -> str:
        """Hash of the entry's fields other than ``hash``, recomputed now."""
        return entry_hash(self.to_dict())


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :meth:`AuditLog.verify`.

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


@dataclass(frozen=True)
class AuditAnchor:
    """The head of the log as recorded outside it, in the signed anchor file.

    Attributes
    ----------
    count
        Number of entries of the log after the last append.
    head
        ``hash`` of the last entry (:data:`GENESIS_HASH` when ``count`` is 0).
    signed_from
        ``seq`` of the first signed entry: every entry from there on must carry a ``mac``.
    """

    count: int
    head: str
    signed_from: int

    def body(self) -> dict[str, Any]:
        """The signed fields of the anchor file."""
        return {
            "version": ANCHOR_VERSION,
            "count": self.count,
            "head": self.head,
            "signed_from": self.signed_from,
        }


def _parse_line(raw: bytes, lineno: int) -> AuditEntry:
    """Parse one line (without its newline) into an entry; raise ValueError with the reason."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"line {lineno}: not valid JSON (truncated?)") from e
    if not isinstance(data, dict):
        raise ValueError(f"line {lineno}: not a JSON object")
    missing = [f for f in ENTRY_FIELDS if f not in data]
    extra = sorted(set(data) - {*ENTRY_FIELDS, "mac"})
    if missing:
        raise ValueError(f"line {lineno}: missing field(s) {', '.join(missing)}")
    if extra:
        raise ValueError(f"line {lineno}: unexpected field(s) {', '.join(extra)}")
    seq = data["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError(f"line {lineno}: seq is not an integer")
    for name in ("time", "prev", "event", "hash"):
        if not isinstance(data[name], str):
            raise ValueError(f"line {lineno}: {name} is not a string")
    if not isinstance(data["record"], dict):
        raise ValueError(f"line {lineno}: record is not a JSON object")
    mac = data.get("mac")
    if mac is not None and not isinstance(mac, str):
        raise ValueError(f"line {lineno}: mac is not a string")
    return AuditEntry(
        seq=seq,
        time=data["time"],
        prev=data["prev"],
        event=data["event"],
        record=data["record"],
        hash=data["hash"],
        mac=mac,
    )


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
                f"{self.anchor_path} exists; refusing to start a new log: {_RESTORE}"
            )
        try:
            self.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
            with open(fd, "ab", buffering=0) as out, file_lock(out.fileno()):
                _restrict(out.fileno(), self.path)
                entry = self._append_locked(out, event, body)
            if created:
                fsync_directory(self.path.parent)
        except OSError as e:
            raise AuditError(f"cannot append to the audit log {self.path}: {e}") from e
        logger.debug("audit %s seq=%d %s", self.path, entry.seq, event)
        return entry

    def _append_locked(self, out: BinaryIO, event: str, body: Any) -> AuditEntry:
        """Check the tail against the anchor, write one entry, update the anchor."""
        last = self._tail_entry()
        key = self._load_key()
        anchor = self._read_anchor(key)
        if key is None:
            if last is not None and last.mac is not None:
                raise AuditError(
                    f"the audit log {self.path} holds signed entries but the site key "
                    f"{self.key_path} is missing; refusing to append: {_RESTORE}"
                )
            key = self._create_key()
            signed_from = 0 if last is None else last.seq + 1
        elif anchor is None:
            raise AuditError(
                f"the audit anchor {self.anchor_path} is missing (deleted?) although the site "
                f"key {self.key_path} exists; refusing to append: {_RESTORE}"
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
            self._write_anchor(key, AuditAnchor(entry.seq + 1, entry.hash, signed_from))
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
        refuse = f"refusing to append: {_RESTORE}"
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
                f"({result.reason}); refusing to append: {_FIX}"
            )

    def _load_key(self) -> bytes | None:
        """The site key, ``None`` when its file does not exist."""
        try:
            mode = os.stat(self.key_path).st_mode
            text = self.key_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise AuditError(f"cannot read the audit key {self.key_path}: {e}; {_RESTORE}") from e
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            key = b""
        if len(key) != KEY_BYTES:
            raise AuditError(
                f"the audit key {self.key_path} is corrupt (expected {2 * KEY_BYTES} hex "
                f"characters); {_RESTORE}"
            )
        if stat.S_IMODE(mode) & 0o077:
            logger.warning("audit key %s was readable by others; setting it to 0600", self.key_path)
            with contextlib.suppress(OSError):
                os.chmod(self.key_path, FILE_MODE)
        return key

    def _create_key(self) -> bytes:
        """Create the site key (0600 file in a 0700 folder); never replaces an existing one."""
        directory = self.key_path.parent
        if not directory.exists():
            directory.mkdir(mode=DIR_MODE, parents=True)
            os.chmod(directory, DIR_MODE)
        key = secrets.token_bytes(KEY_BYTES)
        tmp = write_temporary(self.key_path, key.hex() + "\n")
        try:
            os.link(tmp, self.key_path)  # fails if a key exists: a key is never replaced
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        fsync_directory(directory)
        logger.info("created the audit key %s (back it up with the state directory)", self.key_path)
        return key

    def _read_anchor(self, key: bytes | None) -> AuditAnchor | None:
        """The anchor, verified with ``key``; ``None`` when its file does not exist."""
        try:
            raw = self.anchor_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise AuditError(f"cannot read the audit anchor {self.anchor_path}: {e}") from e
        if key is None:
            raise AuditError(
                f"the audit anchor {self.anchor_path} exists but the site key {self.key_path} "
                f"is missing, so the log cannot be checked; {_RESTORE}"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
            anchor = _parse_anchor(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise AuditError(
                f"the audit anchor {self.anchor_path} is corrupt ({e}); {_RESTORE}"
            ) from e
        if not hmac.compare_digest(data["mac"], _anchor_mac(key, anchor.body())):
            raise AuditError(
                f"the audit anchor {self.anchor_path} is not signed by the site key "
                f"{self.key_path} (edited or forged); {_RESTORE}"
            )
        return anchor

    def _write_anchor(self, key: bytes, anchor: AuditAnchor) -> None:
        """Replace the anchor file atomically (temporary 0600 file, fsync, rename).

        The folder is not fsynced after the rename: a power loss may then leave the previous
        anchor, one entry behind the (fsynced) log, which :meth:`append` and :meth:`verify`
        accept as a crash between an append and its anchor update after checking the chain
        and signatures of the entries beyond it. Never the other way round, since the entry
        is fsynced before the anchor is written.
        """
        body = anchor.body()
        data = canonical_json({**body, "mac": _anchor_mac(key, body)}) + b"\n"
        atomic_write(self.anchor_path, data, fsync_dir=False)

    def _tail_entry(self) -> AuditEntry | None:
        """The last entry, read from the end of the file; ``None`` for an empty log."""
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return None
            f.seek(size - 1)
            if f.read(1) != b"\n":
                raise AuditError(
                    f"the last line of the audit log {self.path} is not terminated "
                    f"(truncated write?); refusing to append: {_FIX}"
                )
            # Read backwards in chunks until the newline ending the second-to-last line.
            start = size
            tail = b""
            while start > 0:
                step = min(_TAIL_CHUNK, start)
                start -= step
                f.seek(start)
                tail = f.read(step) + tail
                cut = tail.rfind(b"\n", 0, len(tail) - 1)
                if cut >= 0:
                    tail = tail[cut + 1 :]
                    break
            line = tail[:-1]
        try:
            entry = _parse_line(line, 0)
        except ValueError as e:
            raise AuditError(
                f"the last line of the audit log {self.path} is corrupt "
                f"({str(e).removeprefix('line 0: ')}); refusing to append: {_FIX}"
            ) from e
        if entry.computed_hash() != entry.hash:
            raise AuditError(
                f"the last entry of the audit log {self.path} (seq {entry.seq}) does not "
                f"match its hash (edited?); refusing to append: {_FIX}"
            )
        return entry

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
                    yield _parse_line(raw.rstrip(b"\n"), lineno)
                except ValueError as e:
                    raise AuditError(f"audit log {self.path}, {e}: {_FIX}") from e

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
                f"refuses to serve requests: {_FIX}"
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
        count = unsigned = 0

        def broken(lineno: int, entries: int, reason: str) -> tuple[AuditVerification, None]:
            logger.warning("audit log %s broken: %s", self.path, reason)
            return AuditVerification(False, entries, lineno, reason, unsigned), None

        with self._reader(lock=lock) as f:
            try:  # under the lock: the first append creates the key and the anchor
                key = self._load_key()
            except AuditError as e:
                return broken(1, 0, f"line 1: signatures cannot be checked: {e}")
            anchor_problem: str | None = None
            try:
                anchor = self._read_anchor(key)
            except AuditError as e:
                anchor, anchor_problem = None, str(e)
            signed_from = None if anchor is None else anchor.signed_from
            prev_hash = GENESIS_HASH
            first_signed: int | None = None
            head_at_anchor = GENESIS_HASH
            ledger: tuple[int, str] | None = None
            for lineno, raw in enumerate(f or (), start=1):
                entry, reason = _check_line(raw, lineno, prev_hash=prev_hash, seq=count)
                if entry is None:
                    return broken(lineno, count, str(reason))
                if entry.mac is None:
                    if first_signed is not None:
                        return broken(
                            lineno,
                            count,
                            f"line {lineno}: no signature after signed entries (signature "
                            "stripped and chain recomputed?)",
                        )
                    if signed_from is not None and entry.seq >= signed_from:
                        return broken(
                            lineno,
                            count,
                            f"line {lineno}: no signature, but the anchor says entries from "
                            f"seq {signed_from} on are signed (signature stripped?)",
                        )
                    unsigned += 1
                else:
                    first_signed = first_signed or lineno
                    if key is not None and not hmac.compare_digest(
                        entry.mac, entry_mac(key, entry.to_dict())
                    ):
                        return broken(
                            lineno,
                            count,
                            f"line {lineno}: signature does not match (entry edited or the "
                            "chain recomputed without the site key)",
                        )
                    if entry.event == LEDGER_EVENT:
                        ledger = _ledger_head(entry.record)
                        if ledger is None:
                            return broken(
                                lineno, count, f"line {lineno}: malformed ledger anchor record"
                            )
                prev_hash = entry.hash
                count += 1
                if anchor is not None and count == anchor.count:
                    head_at_anchor = entry.hash
        if first_signed is not None and key is None:
            return broken(
                first_signed,
                first_signed - 1,
                f"line {first_signed}: the entry is signed but the site key {self.key_path} is "
                f"missing, so no signature can be checked; {_RESTORE}",
            )
        if anchor_problem is not None:
            return broken(count + 1, count, f"line {count + 1}: {anchor_problem}")
        if anchor is None:
            if first_signed is not None or key is not None:
                return broken(
                    count + 1,
                    count,
                    f"line {count + 1}: the audit anchor {self.anchor_path} is missing "
                    f"(deleted?) although the site key {self.key_path} exists, so a truncation "
                    f"of the log ({count} entries found) cannot be ruled out; {_RESTORE}",
                )
        elif count < anchor.count:
            if f is None:
                reason = (
                    f"line 1: the audit log {self.path} is missing (deleted?) but its anchor "
                    f"{self.anchor_path} records {anchor.count} entries; {_RESTORE}"
                )
            else:
                reason = (
                    f"line {count + 1}: the log ends after {count} entries but its anchor "
                    f"{self.anchor_path} records {anchor.count} (expected {anchor.count}, "
                    f"found {count}): the last {anchor.count - count} entries were removed "
                    f"(truncated) or the log was replaced; {_RESTORE}"
                )
            return broken(count + 1, count, reason)
        elif head_at_anchor != anchor.head:
            return broken(
                anchor.count,
                anchor.count - 1,
                f"line {anchor.count}: the entry's hash is not the head its anchor "
                f"{self.anchor_path} records (log rewritten or replaced); {_RESTORE}",
            )
        return AuditVerification(True, count, None, None, unsigned), ledger


def _restrict(fd: int, path: Path) -> None:
    """Set an open state file to 0600 if it is more open (files of older versions)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
        logger.info("setting %s to mode 0600", path)
        os.fchmod(fd, FILE_MODE)


def _parse_anchor(data: Any) -> AuditAnchor:
    """The anchor of a parsed anchor file; ValueError naming what is wrong."""
    fields = ("version", "count", "head", "signed_from", "mac")
    if not isinstance(data, dict) or set(data) != set(fields):
        raise ValueError(f"expected an object with exactly the fields {', '.join(fields)}")
    if data["version"] != ANCHOR_VERSION:
        raise ValueError(f"version is {data['version']!r}, expected {ANCHOR_VERSION}")
    count, head, signed_from = data["count"], data["head"], data["signed_from"]
    if not _is_count(count) or not _is_count(signed_from) or signed_from > count:
        raise ValueError("count and signed_from must be integers with 0 <= signed_from <= count")
    if not _is_hex64(head) or not isinstance(data["mac"], str):
        raise ValueError("head must be 64 hex characters and mac a string")
    return AuditAnchor(count=count, head=head, signed_from=signed_from)


def _ledger_head(record: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(count, head)`` of a ledger anchor record, ``None`` if malformed."""
    count, head = record.get("count"), record.get("head")
    if not _is_count(count) or not _is_hex64(head):
        return None
    return int(count), str(head)  # type: ignore[arg-type]


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hex64(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


def _check_line(
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
        entry = _parse_line(raw[:-1], lineno)
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
