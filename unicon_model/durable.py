"""Small helpers for writes that must survive a crash, and for file locks.

* :func:`atomic_write` replaces a file through a temporary sibling (write, fsync,
  ``os.replace``, fsync of the folder), so a crash leaves the old file or the new one, never a
  torn one. :func:`write_temporary` is its first half, for callers that rename several files
  only once all of them are written, or that ``os.link`` instead of replacing.
* :func:`write_synced` writes a file in place and fsyncs it (files of a staging folder).
* :func:`fsync_directory` makes a new or renamed entry of a folder survive a power loss.
* :func:`file_lock` holds an ``fcntl.flock`` on a lock file or on a file already open.

Used by checkpoints, the registry, certificates and the site's state files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

Content = bytes | str | Callable[[Path], object]
"""What to write: bytes, text (UTF-8), or a function writing the file at the path it is given."""

LOCK_POLL_S = 0.02
"""Pause between two tries of :func:`file_lock` with a timeout."""


def fsync_directory(directory: str | os.PathLike[str], *, strict: bool = False) -> None:
    """Fsync a directory so a newly created or renamed entry survives a crash.

    Parameters
    ----------
    directory
        The folder to fsync.
    strict
        Raise the :class:`OSError` of a folder that cannot be opened or fsynced. By default
        (best effort) such folders, e.g. on platforms that cannot fsync one, are skipped.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _write_handle(handle: BinaryIO, data: bytes, *, fsync: bool) -> None:
    handle.write(data)
    handle.flush()
    if fsync:
        os.fsync(handle.fileno())


def _as_bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def write_synced(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Create or truncate ``path``, write ``data`` (text as UTF-8) and fsync it.

    Not atomic: for files of a folder that is itself renamed into place once complete.
    """
    with open(path, "wb") as handle:
        _write_handle(handle, _as_bytes(data), fsync=True)


def write_temporary(
    path: str | os.PathLike[str],
    content: Content,
    *,
    mode: int | None = None,
    fsync: bool = True,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> Path:
    """Write ``content`` to a new temporary file next to ``path`` and return its path.

    The temporary file is created by :func:`tempfile.mkstemp` (mode 0600) in ``path``'s
    folder, so it can later be renamed onto ``path``; it is removed if anything fails.

    Parameters
    ----------
    path
        The file the temporary one is meant to become.
    content
        Bytes, text (written as UTF-8), or a function called with the temporary file's path
        that writes it (e.g. ``lambda tmp: save_file(tensors, str(tmp))``).
    mode
        Permission bits set (``fchmod``) before anything is written; ``None`` keeps 0600.
    fsync
        Fsync the file once written.
    prefix, suffix
        Name of the temporary file: ``<prefix><random><suffix>``; the prefix defaults to
        ``.<name of path>.``.

    Returns
    -------
    Path
        The temporary file, complete (and fsynced if ``fsync``).
    """
    path = Path(path)
    name_prefix = f".{path.name}." if prefix is None else prefix
    fd, name = tempfile.mkstemp(prefix=name_prefix, suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if callable(content):
            os.close(fd)
            content(tmp)
            if fsync:
                with open(tmp, "rb") as handle:
                    os.fsync(handle.fileno())
        else:
            with os.fdopen(fd, "wb") as handle:
                _write_handle(handle, _as_bytes(content), fsync=fsync)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(
    path: str | os.PathLike[str],
    content: Content,
    *,
    mode: int | None = None,
    fsync: bool = True,
    fsync_dir: bool = True,
    strict_dir: bool = False,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Replace ``path`` by ``content``: temporary sibling, fsync, ``os.replace``, fsync folder.

    A crash leaves the old file or the new one, never a torn one. On any exception the
    temporary file is removed and the old file is left as it was.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    content, mode, prefix, suffix
        As for :func:`write_temporary` (``mode=None`` gives 0600).
    fsync
        Fsync the file before it is renamed (without, a power loss may leave a torn file).
    fsync_dir
        Fsync the folder after the rename, so the rename itself survives a power loss.
    strict_dir
        Raise when the folder cannot be fsynced (default: best effort, see
        :func:`fsync_directory`).
    """
    path = Path(path)
    tmp = write_temporary(path, content, mode=mode, fsync=fsync, prefix=prefix, suffix=suffix)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if fsync_dir:
        fsync_directory(path.parent, strict=strict_dir)


def _acquire(fd: int, operation: int, timeout_s: float | None) -> None:
    if timeout_s is None:
        fcntl.flock(fd, operation)
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"still locked after {timeout_s:g} s") from None
            time.sleep(LOCK_POLL_S)


@contextlib.contextmanager
def file_lock(
    target: str | os.PathLike[str] | int,
    *,
    exclusive: bool = True,
    mode: int = 0o600,
    timeout_s: float | None = None,
) -> Iterator[int]:
    """Hold an ``fcntl.flock`` on a file for the duration of the ``with`` block.

    The lock belongs to the open file, so it excludes other processes and other threads
    (that open the file themselves) alike, and the kernel releases it if the holder dies.

    Parameters
    ----------
    target
        A path: the lock file, opened (created with ``mode`` if missing) and closed again. Or
        the descriptor of a file already open (e.g. a log being appended to), which is
        locked and unlocked but left open.
    exclusive
        An exclusive lock (writers); ``False`` takes a shared one (readers).
    mode
        Permission bits of a lock file this creates (filtered by the umask).
    timeout_s
        Give up after this many seconds; ``None`` waits as long as it takes.

    Yields
    ------
    int
        The locked file descriptor.

    Raises
    ------
    TimeoutError
        If the lock is still held by another after ``timeout_s`` seconds.
    OSError
        If the lock file cannot be opened.
    """
    if isinstance(target, int):
        fd, owned = target, False
    else:
        fd, owned = os.open(target, os.O_RDWR | os.O_CREAT, mode), True
    try:
        _acquire(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout_s)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        if owned:
            os.close(fd)
