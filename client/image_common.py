"""What every image reader of :mod:`client.images` shares: size limits and the output form.

Files are untrusted: :class:`Limits` refuses a declared shape over :data:`MAX_IMAGE_VOXELS`
or :data:`MAX_IMAGE_BYTES` before any voxel data is read, and :func:`check_file_holds`
refuses a file too short (or a gzip file too small) for the data its header declares.
Readers return ``float32`` channel-first arrays (:func:`as_float32`) and the meta dictionary
of :func:`image_meta`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.errors import DataError

MAX_IMAGE_VOXELS = 512**3
"""Default largest number of voxels (all channels together) an image may declare."""

MAX_IMAGE_BYTES = 1 << 30
"""Default largest size of the voxel data an image may declare (voxels x item size), bytes."""

_MAX_DEFLATE_RATIO = 1032
"""Deflate (gzip) expands at most about 1032:1; a ``.gz`` declaring more data is truncated."""

_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"


class Limits:
    """The size limits of one :func:`client.images.read_image` call.

    Parameters
    ----------
    max_voxels
        Largest number of voxels (all channels together) an image may declare.
    max_bytes
        Largest size of the declared voxel data (voxels x item size), in bytes.
    """

    def __init__(self, max_voxels: int, max_bytes: int) -> None:
        self.max_voxels = int(max_voxels)
        self.max_bytes = int(max_bytes)

    def check(
        self, path: Path, shape: Sequence[int], itemsize: int, what: str = "the header"
    ) -> int:
        """Refuse a declared ``shape`` over the limits; return its data size in bytes.

        Raises
        ------
        DataError
            Naming ``path``, the declared shape, its voxels and bytes, and the limits.
        """
        dims = [int(d) for d in shape]
        if any(d < 0 for d in dims):
            raise DataError(f"{path}: {what} declares a negative size in shape {dims_text(dims)}")
        voxels = math.prod(dims)
        nbytes = voxels * max(int(itemsize), 1)
        if voxels > self.max_voxels or nbytes > self.max_bytes:
            raise DataError(
                f"{path}: {what} declares shape {dims_text(dims)} = {voxels:,} voxels "
                f"({_size(nbytes)}), more than the limit of {self.max_voxels:,} voxels and "
                f"{_size(self.max_bytes)}; refusing to read it (crop or resample the image, "
                "or raise the limit if it is genuine)"
            )
        return nbytes


def dims_text(shape: Sequence[int]) -> str:
    """``shape`` as ``AxBxC`` (``()`` when empty)."""
    return "x".join(str(d) for d in shape) if shape else "()"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def check_file_holds(path: Path, offset: int, nbytes: int, *, compressed: bool) -> None:
    """Refuse a file too short (or, gzip, too small to expand) to hold the declared data."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from e
    needed = offset + nbytes
    if compressed:
        if needed > size * _MAX_DEFLATE_RATIO + (1 << 16):
            raise DataError(
                f"{path}: the header declares {_size(nbytes)} of voxel data, but a gzip file "
                f"of {_size(size)} cannot expand to that much; the file is truncated or corrupt"
            )
    elif size < needed:
        raise DataError(
            f"{path}: the header declares {_size(nbytes)} of voxel data from byte {offset}, "
            f"but the file has only {size} bytes; the file is truncated or corrupt"
        )


def has_dicm_preamble(path: Path) -> bool:
    """Whether ``path`` has the 128-byte preamble followed by ``DICM``."""
    try:
        with path.open("rb") as handle:
            handle.seek(_DICM_OFFSET)
            return handle.read(len(_DICM_MAGIC)) == _DICM_MAGIC
    except OSError:
        return False


def as_float32(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` as a contiguous ``float32`` array; refuse voxels that are not numbers."""
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: voxels of type {array.dtype} are not numbers; store a numeric array"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def image_meta(spacing: Sequence[float], affine: np.ndarray, fmt: str) -> dict[str, Any]:
    """The meta dictionary of a reader: ``spacing``, ``affine`` (``float64``) and ``format``."""
    return {
        "spacing": tuple(float(s) for s in spacing),
        "affine": np.asarray(affine, dtype=np.float64),
        "format": fmt,
    }


def reduce_affine(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The ``(D + 1) x (D + 1)`` part of a 4x4 affine for ``D`` spatial axes."""
    if spatial_dims >= 3:
        return affine
    keep = [*range(spatial_dims), 3]
    return affine[np.ix_(keep, keep)]
