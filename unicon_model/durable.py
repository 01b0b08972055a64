"""Small helpers for writes that must survive a crash (used by checkpoints and logs)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Fsync a directory so a newly created or renamed entry survives a crash (best effort).

    Platforms that cannot open or fsync a directory are silently skipped.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
