"""Writing keys and certificates of :mod:`server.certs` safely.

Every file is written atomically (a temporary file in the same folder, then
:func:`os.replace`); private keys get mode ``0600``, public files ``0644`` and folders this
module creates ``0700``. Existing files are refused unless overwriting is asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.errors import CoordinatorError
from unicon_model.durable import write_temporary

logger = logging.getLogger(__name__)

PRIVATE_MODE = 0o600
"""Mode of private key files."""
PUBLIC_MODE = 0o644
"""Mode of certificates and public keys."""
DIR_MODE = 0o700
"""Mode of the folders created for keys."""


def ensure_dir(out: Path) -> None:
    """Create ``out`` (and parents) with mode 0700 when missing; leave existing folders alone.

    Raises
    ------
    CoordinatorError
        ``out`` exists and is not a folder, or it cannot be created.
    """
    if out.exists():
        if not out.is_dir():
            raise CoordinatorError(f"{out} exists and is not a folder")
        return
    try:
        out.mkdir(parents=True, mode=DIR_MODE)
        os.chmod(out, DIR_MODE)  # mkdir's mode is filtered by the umask
    except OSError as e:
        raise CoordinatorError(f"cannot create folder {out}: {e}") from e


def refuse_existing(paths: Sequence[Path], overwrite: bool) -> None:
    """Refuse to go on if one of ``paths`` exists, unless ``overwrite``.

    Raises
    ------
    CoordinatorError
        Naming every existing file.
    """
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        names = ", ".join(str(p) for p in existing)
        raise CoordinatorError(
            f"{names} already exist{'s' if len(existing) == 1 else ''}; "
            "refusing to replace keys or certificates (use --overwrite / overwrite=True)"
        )


def write_all(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Atomically write each ``(path, data, mode)``: all temporaries first, then renames.

    Raises
    ------
    CoordinatorError
        A file cannot be written; no temporary file is left behind.
    """
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            temps.append((write_temporary(path, data, mode=mode), path))
        for tmp, path in temps:
            os.replace(tmp, path)
            logger.debug("wrote %s", path)
    except OSError as e:
        raise CoordinatorError(f"cannot write {path}: {e}") from e
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
