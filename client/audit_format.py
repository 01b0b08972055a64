"""The audit log's formats: entries and the anchor, canonical JSON, hashes and MACs.

An entry (:class:`AuditEntry`) is one line of the log; its ``hash`` is the sha256 of the
canonical JSON (:func:`canonical_json`) of its other fields and its ``mac`` the HMAC-SHA256
of them under the site key (:func:`entry_mac`). The anchor (:class:`AuditAnchor`) records
the log's count and head outside it. See :mod:`client.audit` for the whole scheme.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from client.errors import AuditError

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

FIX = "run `unicon site audit` to find the broken entry"
"""How to find a broken entry, quoted in errors."""

RESTORE = "restore the state directory (log, anchor and keys/) from a backup"
"""How to repair a log, anchor or key that cannot be trusted, quoted in errors."""


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


def anchor_mac(key: bytes, body: Mapping[str, Any]) -> str:
    """HMAC-SHA256 hex, under ``key``, of an anchor's signed fields (:meth:`AuditAnchor.body`)."""
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


def parse_line(raw: bytes, lineno: int) -> AuditEntry:
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


def parse_anchor(data: Any) -> AuditAnchor:
    """The anchor of a parsed anchor file; ValueError naming what is wrong."""
    fields = ("version", "count", "head", "signed_from", "mac")
    if not isinstance(data, dict) or set(data) != set(fields):
        raise ValueError(f"expected an object with exactly the fields {', '.join(fields)}")
    if data["version"] != ANCHOR_VERSION:
        raise ValueError(f"version is {data['version']!r}, expected {ANCHOR_VERSION}")
    count, head, signed_from = data["count"], data["head"], data["signed_from"]
    if not is_count(count) or not is_count(signed_from) or signed_from > count:
        raise ValueError("count and signed_from must be integers with 0 <= signed_from <= count")
    if not is_hex64(head) or not isinstance(data["mac"], str):
        raise ValueError("head must be 64 hex characters and mac a string")
    return AuditAnchor(count=count, head=head, signed_from=signed_from)


def ledger_head(record: Mapping[str, Any]) -> tuple[int, str] | None:
    """``(count, head)`` of a ledger anchor record, ``None`` if malformed."""
    count, head = record.get("count"), record.get("head")
    if not is_count(count) or not is_hex64(head):
        return None
    return int(count), str(head)  # type: ignore[arg-type]


def is_count(value: Any) -> bool:
    """Whether ``value`` is a count: an ``int`` (not a ``bool``) >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_hex64(value: Any) -> bool:
    """Whether ``value`` is a sha256 hex digest: 64 lowercase hex characters."""
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )
