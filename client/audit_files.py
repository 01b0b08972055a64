"""The audit log's files beside its lines: the site key, the signed anchor, the log's tail.

The key (``keys/audit.key``, 0600 in a 0700 folder) is created once and never replaced;
the anchor is rewritten atomically after every append and verified with the key; the last
entry of the log is read from the end of the file, so an append never reads the whole log.
See :mod:`client.audit` for the whole scheme.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path

from client.audit_format import (
    DIR_MODE,
    FILE_MODE,
    FIX,
    KEY_BYTES,
    RESTORE,
    AuditAnchor,
    AuditEntry,
    anchor_mac,
    canonical_json,
    parse_anchor,
    parse_line,
)
from client.errors import AuditError
from unicon_model.durable import atomic_write, fsync_directory, write_temporary

logger = logging.getLogger(__name__)

_TAIL_CHUNK = 64 * 1024


def restrict(fd: int, path: Path) -> None:
    """Set an open state file to 0600 if it is more open (files of older versions)."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
        logger.info("setting %s to mode 0600", path)
        os.fchmod(fd, FILE_MODE)


def load_key(key_path: Path) -> bytes | None:
    """The site key stored at ``key_path``, ``None`` when its file does not exist.

    Raises
    ------
    AuditError
        The file cannot be read or does not hold :data:`KEY_BYTES` bytes in hex.
    """
    try:
        mode = os.stat(key_path).st_mode
        text = key_path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise AuditError(f"cannot read the audit key {key_path}: {e}; {RESTORE}") from e
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise AuditError(
            f"the audit key {key_path} is corrupt (expected {2 * KEY_BYTES} hex "
            f"characters); {RESTORE}"
        )
    if stat.S_IMODE(mode) & 0o077:
        logger.warning("audit key %s was readable by others; setting it to 0600", key_path)
        with contextlib.suppress(OSError):
            os.chmod(key_path, FILE_MODE)
    return key


def create_key(key_path: Path) -> bytes:
    """Create the site key (0600 file in a 0700 folder); never replaces an existing one."""
    directory = key_path.parent
    if not directory.exists():
        directory.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(directory, DIR_MODE)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = write_temporary(key_path, key.hex() + "\n")
    try:
        os.link(tmp, key_path)  # fails if a key exists: a key is never replaced
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_directory(directory)
    logger.info("created the audit key %s (back it up with the state directory)", key_path)
    return key


def read_anchor(anchor_path: Path, key_path: Path, key: bytes | None) -> AuditAnchor | None:
    """The anchor, verified with ``key`` (read from ``key_path``); ``None`` when it is absent.

    Raises
    ------
    AuditError
        The anchor cannot be read, is corrupt or not signed by ``key``, or exists while the
        key does not.
    """
    try:
        raw = anchor_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuditError(f"cannot read the audit anchor {anchor_path}: {e}") from e
    if key is None:
        raise AuditError(
            f"the audit anchor {anchor_path} exists but the site key {key_path} "
            f"is missing, so the log cannot be checked; {RESTORE}"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
        anchor = parse_anchor(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"the audit anchor {anchor_path} is corrupt ({e}); {RESTORE}") from e
    if not hmac.compare_digest(data["mac"], anchor_mac(key, anchor.body())):
        raise AuditError(
            f"the audit anchor {anchor_path} is not signed by the site key "
            f"{key_path} (edited or forged); {RESTORE}"
        )
    return anchor


def write_anchor(anchor_path: Path, key: bytes, anchor: AuditAnchor) -> None:
    """Replace the anchor file atomically (temporary 0600 file, fsync, rename).

    The folder is not fsynced after the rename: a power loss may then leave the previous
    anchor, one entry behind the (fsynced) log, which :meth:`client.audit.AuditLog.append`
    and :meth:`~client.audit.AuditLog.verify` accept as a crash between an append and its
    anchor update after checking the chain and signatures of the entries beyond it. Never
    the other way round, since the entry is fsynced before the anchor is written.
    """
    body = anchor.body()
    data = canonical_json({**body, "mac": anchor_mac(key, body)}) + b"\n"
    atomic_write(anchor_path, data, fsync_dir=False)


def _last_line(path: Path) -> bytes | None:
    """The last line of ``path`` without its newline; ``None`` for an empty file."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) != b"\n":
            raise AuditError(
                f"the last line of the audit log {path} is not terminated "
                f"(truncated write?); refusing to append: {FIX}"
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
        return tail[:-1]


def tail_entry(path: Path) -> AuditEntry | None:
    """The last entry of the log at ``path``, read from its end; ``None`` for an empty log.

    Raises
    ------
    AuditError
        The last line is unterminated, not a well-formed entry, or does not match its hash.
    """
    line = _last_line(path)
    if line is None:
        return None
    try:
        entry = parse_line(line, 0)
    except ValueError as e:
        raise AuditError(
            f"the last line of the audit log {path} is corrupt "
            f"({str(e).removeprefix('line 0: ')}); refusing to append: {FIX}"
        ) from e
    if entry.computed_hash() != entry.hash:
        raise AuditError(
            f"the last entry of the audit log {path} (seq {entry.seq}) does not "
            f"match its hash (edited?); refusing to append: {FIX}"
        )
    return entry
