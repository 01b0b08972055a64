"""Content-addressed on-disk cache of model components received from the server.

A component's tensors are stored once as ``<directory>/<digest>.safetensors`` where the
digest is :func:`unicon_model.checkpoint.tensor_digest` of the tensors, so the server can
send a digest instead of an unchanged component. Every :meth:`ComponentCache.get`
re-computes the digest of what it loaded: a corrupt entry is deleted and reported as a miss,
never used. Writes are atomic (temporary file, ``os.replace``) but not fsynced: a power loss
that tears an entry costs a resend, never a wrong component. Reads and writes set
the file's modification time, which orders :meth:`ComponentCache.evict` (least recently
used first) when a size limit is given.

Files are checked before they are decoded (:func:`check_safetensors_file`): a file larger
than a bound, or whose safetensors header (the first 8 bytes give its length) is larger
than :data:`MAX_HEADER_BYTES` or than the file, is refused without being read, so a crafted
or torn file cannot make the site allocate gigabytes. The same helper guards the site's
stored replies (:func:`load_safetensors`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unicon_model.checkpoint import tensor_digest
from unicon_model.durable import atomic_write

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
"""File suffix of cache entries."""

DEFAULT_MAX_BYTES = 4 * 1024**3
"""Default size limit of a site's whole component cache (4 GiB), LRU-evicted after puts."""

DEFAULT_MAX_FILE_BYTES = 2 * 1024**3
"""Default bound on one safetensors file read back (a cache entry or a stored reply)."""

MAX_HEADER_BYTES = 16 * 1024**2
"""Bound on a safetensors JSON header (16 MiB: about 100 000 tensors)."""

_DIGEST = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is 64 lowercase hex characters, else raise.

    Parameters
    ----------
    digest
        A sha256 hex digest naming a cache entry.

    Returns
    -------
    str
        The same digest (safe to use as a file name).

    Raises
    ------
    ValueError
        ``digest`` is not a string of exactly 64 characters ``0-9a-f`` (this also rejects
        path components such as ``"../x"``).
    """
    if not isinstance(digest, str) or _DIGEST.fullmatch(digest) is None:
        raise ValueError(
            f"component digest {digest!r} is not a sha256 hex digest "
            "(expected 64 lowercase characters 0-9a-f)"
        )
    return digest


class UnsafeFileError(ValueError):
    """A safetensors file is larger than its bound or has an impossible header."""


def check_safetensors_file(path: str | os.PathLike[str], *, max_bytes: int) -> int:
    """Check a safetensors file's size and header length before it is decoded.

    Parameters
    ----------
    path
        The file.
    max_bytes
        The largest file accepted.

    Returns
    -------
    int
        The file's size in bytes.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    UnsafeFileError
        Naming the file: larger than ``max_bytes``, shorter than the 8-byte header length,
        or a header length over :data:`MAX_HEADER_BYTES` or past the end of the file.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise UnsafeFileError(
                f"{path}: {size} bytes is over the bound of {max_bytes} bytes; refusing to read it"
            )
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise UnsafeFileError(f"{path}: {size} bytes is too short for a safetensors file")
    header = int.from_bytes(prefix, "little")
    if header > MAX_HEADER_BYTES or header > size - 8:
        raise UnsafeFileError(
            f"{path}: safetensors header claims {header} bytes (file {size} bytes, bound "
            f"{MAX_HEADER_BYTES}); the file is corrupt or crafted"
        )
    return size


def load_safetensors(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> dict[str, torch.Tensor]:
    """:func:`safetensors.torch.load_file` on the CPU after :func:`check_safetensors_file`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    UnsafeFileError
        The file breaks a size bound (see :func:`check_safetensors_file`).
    Exception
        Whatever safetensors raises on a corrupt body.
    """
    check_safetensors_file(path, max_bytes=max_bytes)
    return load_file(str(path), device="cpu")


def _savable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, cloning any that share storage with another."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"component tensor {key!r} is a {type(value).__name__}, not a torch.Tensor"
            )
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() > 0 and ptr in seen:
            t = t.clone()
        elif t.numel() > 0:
            seen.add(ptr)
        out[key] = t
    return out


def _touch(path: Path) -> None:
    """Set ``path``'s times to now with nanosecond precision (orders LRU eviction)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class ComponentCache:
    """Content-addressed store of component tensors under ``directory``.

    Parameters
    ----------
    directory
        Cache folder, usually ``<state-dir>/components``; created if missing.
    max_bytes
        Size limit of all entries together; after each :meth:`put` the least recently used
        entries are evicted until the cache fits (the entry just put is kept). ``None``: no
        limit.
    max_entry_bytes
        Largest entry stored or read back: a bigger component is not cached (it is resent
        next time) and a bigger file is deleted unread by :meth:`get`.

    Raises
    ------
    ValueError
        ``max_bytes`` is negative or ``max_entry_bytes`` is not positive.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int | None = None,
        max_entry_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if max_entry_bytes <= 0:
            raise ValueError(f"max_entry_bytes must be > 0, got {max_entry_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path_of(self, digest: str) -> Path:
        """File of the entry ``digest`` (which need not exist).

        Raises
        ------
        ValueError
            ``digest`` is not 64 lowercase hex characters.
        """
        return self.directory / f"{check_digest(digest)}{SUFFIX}"

    def put(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """Store ``tensors`` under their digest, unless already present.

        Parameters
        ----------
        tensors
            The component's tensors by name.

        Returns
        -------
        str
            ``tensor_digest(tensors)``, the key for :meth:`get` (also when the component is
            over ``max_entry_bytes`` and therefore not stored).
        """
        digest = tensor_digest(tensors)
        path = self.path_of(digest)
        if path.exists():
            _touch(path)
            return digest
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        if payload > self.max_entry_bytes:
            logger.warning(
                "component %s (%d bytes) is over the cache's entry bound of %d bytes; not cached",
                digest,
                payload,
                self.max_entry_bytes,
            )
            return digest
        atomic_write(
            path,
            lambda tmp: save_file(_savable(tensors), str(tmp)),
            # no fsync: every get() re-computes the digest, so an entry torn by a power loss
            # is deleted and served as a miss (the coordinator then resends the component)
            fsync=False,
            fsync_dir=False,
            prefix=f"{_TMP_PREFIX}{digest[:16]}-",
            suffix=SUFFIX,
        )
        _touch(path)
        logger.debug("cached component %s (%d bytes)", digest, path.stat().st_size)
        if self.max_bytes is not None:
            self.evict(keep=(digest,))
        return digest

    def get(self, digest: str) -> dict[str, torch.Tensor] | None:
        """Tensors of the entry ``digest``, verified, or ``None`` on a miss.

        An entry over ``max_entry_bytes`` or with an impossible header (checked before it is
        decoded), one that cannot be read, or one whose content does not hash to ``digest``
        is deleted (with a logged warning) and reported as a miss.

        Parameters
        ----------
        digest
            64 lowercase hex characters.

        Returns
        -------
        dict[str, torch.Tensor] | None
            CPU tensors by name, or ``None``.

        Raises
        ------
        ValueError
            ``digest`` is not 64 lowercase hex characters.
        """
        path = self.path_of(digest)
        try:
            tensors = load_safetensors(path, max_bytes=self.max_entry_bytes)
        except FileNotFoundError:
            return None
        except Exception as e:  # safetensors raises its own error types on corrupt headers
            logger.warning("component cache entry %s unreadable (%s); deleting it", path, e)
            path.unlink(missing_ok=True)
            return None
        actual = tensor_digest(tensors)
        if actual != digest:
            logger.warning(
                "component cache entry %s hashes to %s (corrupt); deleting it", path, actual
            )
            path.unlink(missing_ok=True)
            return None
        # The entry may be evicted by another process meanwhile; the content is verified.
        with contextlib.suppress(FileNotFoundError):
            _touch(path)
        return tensors

    def __contains__(self, digest: object) -> bool:
        """Whether an entry ``digest`` exists (not verified: :meth:`get` verifies).

        Raises
        ------
        ValueError
            ``digest`` is not 64 lowercase hex characters.
        """
        return self.path_of(check_digest(digest)).is_file()

    def digests(self) -> list[str]:
        """Digests of all entries, sorted."""
        return sorted(
            p.name[: -len(SUFFIX)]
            for p in self.directory.glob(f"*{SUFFIX}")
            if _DIGEST.fullmatch(p.name[: -len(SUFFIX)])
        )

    def size_bytes(self) -> int:
        """Total size of all entries in bytes."""
        return sum(size for _, size, _ in self._stats())

    def _stats(self) -> list[tuple[int, int, str]]:
        """``(mtime_ns, size, digest)`` of every entry, oldest first."""
        stats: list[tuple[int, int, str]] = []
        for digest in self.digests():
            try:
                st = self.path_of(digest).stat()
            except FileNotFoundError:
                continue
            stats.append((st.st_mtime_ns, st.st_size, digest))
        return sorted(stats)

    def evict(self, *, keep: Collection[str] = ()) -> list[str]:
        """Remove least recently used entries until the total is at most ``max_bytes``.

        Temporary files left by interrupted writes more than an hour old are removed too.

        Parameters
        ----------
        keep
            Digests never evicted by this call (e.g. the entry just stored).

        Returns
        -------
        list[str]
            Digests removed, in eviction order (empty when ``max_bytes`` is ``None``).
        """
        cutoff = time.time() - _STALE_TMP_S
        for tmp in self.directory.glob(f"{_TMP_PREFIX}*"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                continue
        if self.max_bytes is None:
            return []
        stats = self._stats()
        total = sum(size for _, size, _ in stats)
        removed: list[str] = []
        for _, size, digest in stats:
            if total <= self.max_bytes:
                break
            if digest in keep:
                continue
            self.path_of(digest).unlink(missing_ok=True)
            total -= size
            removed.append(digest)
            logger.info("evicted component %s (%d bytes) from %s", digest, size, self.directory)
        return removed
