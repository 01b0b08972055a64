"""Reading a site's image files into channel-first arrays with their geometry.

:func:`read_image` is the one entry point used by the data pipeline and the manifest check.
It returns a ``float32`` array shaped ``(C, *spatial)`` (a plain 2D image or 3D volume gets
``C = 1``) and a meta dictionary with

- ``"spacing"``: voxel size per spatial axis (a tuple of floats, in mm for medical formats);
- ``"affine"``: the ``(D + 1) x (D + 1)`` voxel-to-world matrix (``float64``, RAS+ world
  coordinates as in NIfTI);
- ``"format"``: ``"nifti"``, ``"npy"``, ``"dicom"`` or ``"dicom-series"``.

Supported inputs:

- NIfTI (``.nii``, ``.nii.gz``) through nibabel; the scaling of the header is applied, a 4D
  image ``(X, Y, Z, C)`` becomes ``(C, X, Y, Z)``;
- NumPy ``.npy`` (loaded without pickle): 2D and 3D arrays get a channel axis, 4D arrays are
  taken as already channel-first; spacing 1 and an identity affine;
- a single DICOM file (``.dcm``, or any file with the ``DICM`` preamble), single- or
  multi-frame;
- a DICOM series folder: every DICOM file of the folder is read, the slices are sorted by
  their position along the slice normal (``ImagePositionPatient`` projected on the normal of
  ``ImageOrientationPatient``; fallback ``InstanceNumber``) and stacked.

DICOM pixels are rescaled with ``RescaleSlope``/``RescaleIntercept`` (Hounsfield units for
CT) and laid out like NIfTI: the first spatial axis runs along a row (DICOM columns), the
second along a column (DICOM rows), the third across slices. DICOM is read with pydicom
directly rather than MONAI's ``PydicomReader`` (which orders slices by ``InstanceNumber``) so
that the slice order, rescaling and geometry do not depend on optional decoder plugins; the
reader is :class:`DicomReading`, which has MONAI's ``ImageReader`` interface, and
:class:`DicomReader` is the same reader as a MONAI ``ImageReader`` subclass for
``LoadImage(reader=DicomReader())`` (made on first access: importing this module does not
import MONAI).

Files are untrusted: before any voxel data is read or decoded, the size the header declares
(shape x item size; for DICOM rows x columns x frames x samples, summed over a series) is
checked against :data:`MAX_IMAGE_VOXELS` and :data:`MAX_IMAGE_BYTES` (both can be lowered or
raised per call), and against what the file can hold (an uncompressed file must be long
enough, a gzip file cannot expand more than deflate allows). So a 71-byte ``.nii.gz``
declaring 720^3 voxels is refused at once instead of allocating gigabytes.

The readers live next to this module: :mod:`client.image_common` (limits, output form),
:mod:`client.image_files` (NIfTI, NumPy), :mod:`client.dicom_series` and
:mod:`client.dicom_reader` (DICOM); their public names used elsewhere are re-exported here.

Every failure (missing file, unsupported extension, corrupt content, oversized or truncated
data, empty DICOM folder, inconsistent series) raises :class:`client.errors.DataError` naming
the path and the reason.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.dicom_reader import DicomReading, read_dicom
from client.dicom_series import DicomImage
from client.errors import DataError
from client.image_common import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_VOXELS,
    Limits,
    has_dicm_preamble,
)
from client.image_files import read_nifti, read_npy

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_VOXELS",
    "SUPPORTED_SUFFIXES",
    "DicomImage",
    "DicomReading",
    "read_image",
]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".npy", ".dcm")
"""File name endings :func:`read_image` reads (plus DICOM files with a ``DICM`` preamble and
DICOM series folders)."""


def read_image(
    path: str | Path,
    *,
    max_voxels: int = MAX_IMAGE_VOXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image file or DICOM series folder as a channel-first ``float32`` array.

    Parameters
    ----------
    path
        A NIfTI (``.nii``/``.nii.gz``), NumPy (``.npy``) or DICOM file, or a folder holding
        one DICOM series.
    max_voxels
        Largest number of voxels (all channels together) the file may declare; checked on
        the header, before any voxel data is read.
    max_bytes
        Largest size of the declared voxel data (voxels x item size), in bytes; checked
        likewise.

    Returns
    -------
    array
        ``float32`` array shaped ``(C, *spatial)``; 2D and 3D single-channel data get
        ``C = 1``.
    meta
        ``"spacing"`` (tuple of floats, one per spatial axis), ``"affine"`` (``float64``
        array of shape ``(D + 1, D + 1)``) and ``"format"``.

    Raises
    ------
    DataError
        Naming ``path`` and the reason: it does not exist, is not a regular file or folder,
        has an unsupported extension, cannot be decoded, declares more voxels or bytes than
        the limits (naming the declared shape and the limit), declares more data than the
        file holds, or is an empty or inconsistent DICOM folder.
    """
    path = Path(path)
    limits = Limits(max_voxels, max_bytes)
    if path.is_dir():
        array, meta = read_dicom(path, limits)
    elif not path.exists():
        raise DataError(f"{path}: the file does not exist")
    elif not path.is_file():
        raise DataError(f"{path}: not a regular file or folder")
    else:
        array, meta = _read_file(path, limits)
    logger.debug(
        "read %s (%s): shape %s, spacing %s",
        path,
        meta["format"],
        array.shape,
        meta["spacing"],
    )
    return array, meta


def _read_file(path: Path, limits: Limits) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_image` for a regular file: the reader its name (or preamble) calls for."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path, limits)
    if name.endswith(".npy"):
        return read_npy(path, limits)
    if name.endswith(".dcm") or has_dicm_preamble(path):
        return read_dicom(path, limits)
    supported = ", ".join(SUPPORTED_SUFFIXES)
    raise DataError(
        f"{path}: unsupported file type {_suffix(path)!r}; supported: {supported}, "
        "DICOM files with a DICM preamble, or a folder holding one DICOM series"
    )


def _suffix(path: Path) -> str:
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return path.suffix or "(no extension)"


def _dicom_reader_class() -> type[DicomReading]:
    """:class:`DicomReading` as a subclass of :class:`monai.data.ImageReader`."""
    from monai.data import ImageReader

    class DicomReader(DicomReading, ImageReader):
        """A MONAI ``ImageReader`` for DICOM files and series folders (see :class:`DicomReading`).

        Use it as ``LoadImage(reader=DicomReader())`` or ``LoadImaged(keys, reader=DicomReader())``.
        """

    DicomReader.__module__ = __name__
    DicomReader.__qualname__ = "DicomReader"
    return DicomReader


if TYPE_CHECKING:
    from monai.data import ImageReader

    class DicomReader(DicomReading, ImageReader):
        """A MONAI ``ImageReader`` for DICOM files and series folders (made on first access)."""


def __getattr__(name: str) -> Any:
    """Make :class:`DicomReader` on first access, so that importing this module stays light."""
    if name == "DicomReader":
        cls = _dicom_reader_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
