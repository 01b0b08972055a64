"""Append-only, hash-chained audit log of every request a site served.

The log is a JSON Lines file (``<state-dir>/audit.jsonl``). Each line is one
:class:`AuditEntry` with the fields ``seq`` (0, 1, ...), ``time`` (ISO-8601 UTC),
``prev`` (the previous entry's ``hash``; 64 zeros for the first entry), ``event`` (e.g.
``"train"``, ``"evaluate"``, ``"query"``, ``"refused"``), ``record`` (free JSON data: run id,
stage, round, model hash received, components returned, examples, epsilon spent, metrics)
and ``hash``: the sha256 of the canonical JSON (see :func:`canonical_json`) of the entry
without its ``hash`` field. Editing, removing, reordering or truncating entries therefore
breaks the chain, and :meth:`AuditLog.verify` reports the first broken line.

Appending reads only the last line (to continue ``seq`` and ``prev``), holds an exclusive
``fcntl.flock`` on the file (a site may run one ClientApp process per message) and fsyncs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import AuditError
from unicon_model.durable import fsync_directory

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""The ``prev`` value of the first entry of a log."""

ENTRY_FIELDS = ("seq", "time", "prev", "event", "record", "hash")
"""Fields of every line of the log, in file order."""

_TAIL_CHUNK = 64 * 1024
_FIX = "run `unicon site audit` to find the broken entry"


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
        Sha256 of the canonical JSON of the other fields.
    """

    seq: int
    time: str
    prev: str
    event: str
    record: dict[str, Any]
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """Fields as a plain dictionary, as written to the log."""
        return {
            "seq": self.seq,
            "time": self.time,
            "prev": self.prev,
            "event": self.event,
            "record": self.record,
            "hash": self.hash,
        }

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
        Why that line is broken, starting with ``"line N: "``; ``None`` when ``ok``.
    """

    ok: bool
    entries: int
    first_broken: int | None
    reason: str | None


def _parse_line(raw: bytes, lineno: int) -> AuditEntry:
    """Parse one line (without its newline) into an entry; raise ValueError with the reason."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"line {lineno}: not valid JSON (truncated?)") from e
    if not isinstance(data, dict):
        raise ValueError(f"line {lineno}: not a JSON object")
    missing = [f for f in ENTRY_FIELDS if f not in data]
    extra = sorted(set(data) - set(ENTRY_FIELDS))
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
    return AuditEntry(
        seq=seq,
        time=data["time"],
        prev=data["prev"],
        event=data["event"],
        record=data["record"],
        hash=data["hash"],
    )


class AuditLog:
    """Append-only hash-chained JSONL audit log of one site.

    Parameters
    ----------
    path
        The log file, usually ``<state-dir>/audit.jsonl``; created on the first append.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, event: str, record: Mapping[str, Any]) -> AuditEntry:
        """Append one entry after the current last one, under an exclusive file lock.

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
            ``record`` is not JSON-able, the last line of the log is corrupt, or the file
            cannot be written.
        """
        if not isinstance(event, str) or not event:
            raise ValueError("audit event must be a non-empty string such as 'train'")
        if not isinstance(record, Mapping):
            raise AuditError(f"audit record must be a mapping, got {type(record).__name__}")
        body = to_jsonable(record, field="record")
        created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab", buffering=0) as out:
                fcntl.flock(out.fileno(), fcntl.LOCK_EX)
                try:
                    last = self._tail_entry()
                    fields: dict[str, Any] = {
                        "seq": 0 if last is None else last.seq + 1,
                        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                        "prev": GENESIS_HASH if last is None else last.hash,
                        "event": event,
                        "record": body,
                    }
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
                finally:
                    fcntl.flock(out.fileno(), fcntl.LOCK_UN)
            if created:
                fsync_directory(self.path.parent)
        except OSError as e:
            raise AuditError(f"cannot append to the audit log {self.path}: {e}") from e
        logger.debug("audit %s seq=%d %s", self.path, entry.seq, event)
        return entry

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
        """Check every line: JSON, fields, hash, link to the previous entry and ``seq``.

        Returns
        -------
        AuditVerification
            ``ok`` with the number of entries, or the first broken line and why. A missing
            log verifies as ``ok`` with 0 entries.
        """
        if not self.path.exists():
            return AuditVerification(ok=True, entries=0, first_broken=None, reason=None)
        prev_hash = GENESIS_HASH
        count = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                entry, reason = _check_line(raw, lineno, prev_hash=prev_hash, seq=count)
                if entry is None:
                    logger.warning("audit log %s broken: %s", self.path, reason)
                    return AuditVerification(
                        ok=False, entries=count, first_broken=lineno, reason=reason
                    )
                prev_hash = entry.hash
                count += 1
        return AuditVerification(ok=True, entries=count, first_broken=None, reason=None)


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
