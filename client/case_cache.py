"""The disk cache of preprocessed cases (``.npz`` without pickle).

A case is cached under a key of its source files' paths, sizes and modification times and
the preprocessing settings, so rounds run in fresh processes do not re-read and re-transform
the images; :data:`CACHE_VERSION` changes the key when preprocessing changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unicon_model.durable import atomic_write

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
"""Bumped when preprocessing changes, so stale cache entries are never used."""


@dataclass
class CaseCache:
    """Preprocessed cases on disk (``directory`` ``None``: no disk cache, counts only).

    Attributes
    ----------
    directory
        Folder of the ``.npz`` entries, or ``None``.
    hits, misses
        Cases found in the cache, and cases preprocessed and stored.
    settings
        The preprocessing settings, part of every key.
    """

    directory: Path | None
    hits: int = 0
    misses: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def key(self, files: Sequence[Path]) -> str:
        """The cache key of a case read from ``files`` with :attr:`settings`."""
        parts: list[Any] = [CACHE_VERSION, self.settings]
        for path in files:
            stat = path.stat()
            parts.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        """The cached arrays of ``key`` (``None``: no disk cache, absent or unreadable)."""
        if self.directory is None:
            return None
        path = self.directory / f"{key}.npz"
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable cache entry %s: %s", path, e)
            return None
        self.hits += 1
        return arrays

    def store(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Count a miss and keep ``arrays`` under ``key`` (not fsynced: derived data)."""
        self.misses += 1
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as handle:
                np.savez(handle, **dict(arrays))  # type: ignore[arg-type]

        # A cache of derived data: not fsynced.
        atomic_write(
            self.directory / f"{key}.npz", write, fsync=False, fsync_dir=False, prefix="tmp"
        )
