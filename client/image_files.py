"""Reading NIfTI (``.nii``, ``.nii.gz``) and NumPy (``.npy``) files for :mod:`client.images`.

Both readers check the size the header declares against the :class:`~client.image_common.Limits`
and against what the file can hold before any voxel data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.errors import DataError
from client.image_common import Limits, as_float32, check_file_holds, image_meta, reduce_affine

_NPY_MAGIC = b"\x93NUMPY"


def read_nifti(path: Path, limits: Limits) -> tuple[np.ndarray, dict[str, Any]]:
    """A NIfTI image as a channel-first array (a 4D image ``(X, Y, Z, C)`` becomes ``(C, ...)``).

    Raises
    ------
    DataError
        Naming ``path``: unreadable, over the limits, truncated or of an unsupported shape.
    """
    try:
        image: Any = nib.load(str(path))  # reads the header only; the data stays on disk
        shape = tuple(int(d) for d in image.header.get_data_shape())
        itemsize = int(image.header.get_data_dtype().itemsize)
        offset = int(getattr(image.dataobj, "offset", 0) or 0)
    except Exception as e:  # nibabel raises many unrelated types on a malformed file
        raise DataError(f"{path}: cannot read the NIfTI file: {e}") from e
    nbytes = limits.check(path, shape, itemsize, "the NIfTI header")
    check_file_holds(path, offset, nbytes, compressed=path.name.lower().endswith(".gz"))
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in image.header.get_zooms())
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as e:  # nibabel raises many unrelated types on a malformed file
        raise DataError(f"{path}: cannot read the NIfTI file: {e}") from e
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI vector images: (X, Y, Z, 1, C)
        data = data[:, :, :, 0, :]
    if data.ndim in (2, 3):
        array = data[np.newaxis]
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    else:
        raise DataError(
            f"{path}: a NIfTI image with shape {data.shape} is not supported; use a 2D or 3D "
            "image, or a 4D image with the channels last"
        )
    spatial = array.ndim - 1
    spacing = (zooms + (1.0,) * spatial)[:spatial]
    return as_float32(array, path), image_meta(spacing, reduce_affine(affine, spatial), "nifti")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype[Any], int]:
    """Shape, dtype and data offset of a ``.npy`` file, read from its header only."""
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
            if magic != _NPY_MAGIC:
                raise DataError(f"{path}: not a NumPy .npy file (it lacks the NUMPY header)")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise DataError(
                    f"{path}: NumPy file format version {version[0]}.{version[1]} is not "
                    "supported; save it with numpy.save (format 1.0 or 2.0)"
                )
            return tuple(int(d) for d in shape), dtype, handle.tell()
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"{path}: cannot read the file: {e.strerror or e}") from e
    except Exception as e:  # ValueError on a malformed header
        raise DataError(f"{path}: cannot read the NumPy file header: {e}") from e


def read_npy(path: Path, limits: Limits) -> tuple[np.ndarray, dict[str, Any]]:
    """A ``.npy`` array (read without pickle), channel-first, spacing 1, identity affine.

    Raises
    ------
    DataError
        Naming ``path``: not a NumPy file, holding objects, over the limits or truncated.
    """
    shape, dtype, offset = _npy_header(path)
    if dtype.hasobject:
        raise DataError(
            f"{path}: the array holds Python objects ({dtype}), which are not read (no "
            "pickle); store a numeric array"
        )
    nbytes = limits.check(path, shape, dtype.itemsize, "the NumPy header")
    check_file_holds(path, offset, nbytes, compressed=False)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # ValueError (pickled objects, bad header), OSError, EOFError
        raise DataError(f"{path}: cannot read the NumPy file: {e}") from e
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: expected a single array (.npy), got {type(data).__name__}")
    if data.ndim in (2, 3):
        data = data[np.newaxis]
    elif data.ndim != 4:
        raise DataError(
            f"{path}: an array with shape {data.shape} is not supported; use a 2D or 3D "
            "array, or a 4D channel-first array (C, X, Y, Z)"
        )
    spatial = data.ndim - 1
    return as_float32(data, path), image_meta((1.0,) * spatial, np.eye(spatial + 1), "npy")
