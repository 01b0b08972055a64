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

Every failure (missing file, unsupported extension, corrupt content, oversized or truncated
data, empty DICOM folder, inconsistent series) raises :class:`client.errors.DataError` naming
the path and the reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.errors import DataError

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz", ".npy", ".dcm")
"""File name endings :func:`read_image` reads (plus DICOM files with a ``DICM`` preamble and
DICOM series folders)."""

MAX_IMAGE_VOXELS = 512**3
"""Default largest number of voxels (all channels together) an image may declare."""

MAX_IMAGE_BYTES = 1 << 30
"""Default largest size of the voxel data an image may declare (voxels x item size), bytes."""

_MAX_DEFLATE_RATIO = 1032
"""Deflate (gzip) expands at most about 1032:1; a ``.gz`` declaring more data is truncated."""

_DICM_OFFSET = 128
_DICM_MAGIC = b"DICM"
_NPY_MAGIC = b"\x93NUMPY"
_POSITION_TOLERANCE_MM = 1e-3
"""Slices closer than this along the normal are taken as the same position."""
_UNIFORM_TOLERANCE = 0.05
"""Relative deviation of slice gaps above which a series is reported as non-uniform."""
_PathLike = str | os.PathLike[Any]
_META_KEYS = ("spacing", "affine", "format")
"""The meta keys :func:`read_image` returns."""


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
    limits = _Limits(max_voxels, max_bytes)
    if path.is_dir():
        array, meta = _read_dicom(path, limits)
    elif not path.exists():
        raise DataError(f"{path}: the file does not exist")
    elif not path.is_file():
        raise DataError(f"{path}: not a regular file or folder")
    else:
        name = path.name.lower()
        if name.endswith((".nii", ".nii.gz")):
            array, meta = _read_nifti(path, limits)
        elif name.endswith(".npy"):
            array, meta = _read_npy(path, limits)
        elif name.endswith(".dcm") or _has_dicm_preamble(path):
            array, meta = _read_dicom(path, limits)
        else:
            supported = ", ".join(SUPPORTED_SUFFIXES)
            raise DataError(
                f"{path}: unsupported file type {_suffix(path)!r}; supported: {supported}, "
                "DICOM files with a DICM preamble, or a folder holding one DICOM series"
            )
    logger.debug(
        "read %s (%s): shape %s, spacing %s",
        path,
        meta["format"],
        array.shape,
        meta["spacing"],
    )
    return array, meta


# ---------------------------------------------------------------------------- limits
class _Limits:
    """The size limits of one :func:`read_image` call."""

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
            raise DataError(f"{path}: {what} declares a negative size in shape {_dims(dims)}")
        voxels = math.prod(dims)
        nbytes = voxels * max(int(itemsize), 1)
        if voxels > self.max_voxels or nbytes > self.max_bytes:
            raise DataError(
                f"{path}: {what} declares shape {_dims(dims)} = {voxels:,} voxels "
                f"({_size(nbytes)}), more than the limit of {self.max_voxels:,} voxels and "
                f"{_size(self.max_bytes)}; refusing to read it (crop or resample the image, "
                "or raise the limit if it is genuine)"
            )
        return nbytes


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "()"


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _check_file_holds(path: Path, offset: int, nbytes: int, *, compressed: bool) -> None:
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


# ---------------------------------------------------------------------------- helpers
def _suffix(path: Path) -> str:
    suffixes = path.suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() == ".gz":
        return "".join(suffixes[-2:])
    return path.suffix or "(no extension)"


def _has_dicm_preamble(path: Path) -> bool:
    """Whether ``path`` has the 128-byte preamble followed by ``DICM``."""
    try:
        with path.open("rb") as handle:
            handle.seek(_DICM_OFFSET)
            return handle.read(len(_DICM_MAGIC)) == _DICM_MAGIC
    except OSError:
        return False


def _as_float32(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise DataError(
            f"{path}: voxels of type {array.dtype} are not numbers; store a numeric array"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def _meta(spacing: Sequence[float], affine: np.ndarray, fmt: str) -> dict[str, Any]:
    return {
        "spacing": tuple(float(s) for s in spacing),
        "affine": np.asarray(affine, dtype=np.float64),
        "format": fmt,
    }


def _reduce_affine(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The ``(D + 1) x (D + 1)`` part of a 4x4 affine for ``D`` spatial axes."""
    if spatial_dims >= 3:
        return affine
    keep = [*range(spatial_dims), 3]
    return affine[np.ix_(keep, keep)]


# ---------------------------------------------------------------------------- NIfTI
def _read_nifti(path: Path, limits: _Limits) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        image: Any = nib.load(str(path))  # reads the header only; the data stays on disk
        shape = tuple(int(d) for d in image.header.get_data_shape())
        itemsize = int(image.header.get_data_dtype().itemsize)
        offset = int(getattr(image.dataobj, "offset", 0) or 0)
    except Exception as e:  # nibabel raises many unrelated types on a malformed file
        raise DataError(f"{path}: cannot read the NIfTI file: {e}") from e
    nbytes = limits.check(path, shape, itemsize, "the NIfTI header")
    _check_file_holds(path, offset, nbytes, compressed=path.name.lower().endswith(".gz"))
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
    return _as_float32(array, path), _meta(spacing, _reduce_affine(affine, spatial), "nifti")


# ---------------------------------------------------------------------------- NumPy
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


def _read_npy(path: Path, limits: _Limits) -> tuple[np.ndarray, dict[str, Any]]:
    shape, dtype, offset = _npy_header(path)
    if dtype.hasobject:
        raise DataError(
            f"{path}: the array holds Python objects ({dtype}), which are not read (no "
            "pickle); store a numeric array"
        )
    nbytes = limits.check(path, shape, dtype.itemsize, "the NumPy header")
    _check_file_holds(path, offset, nbytes, compressed=False)
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
    return _as_float32(data, path), _meta((1.0,) * spatial, np.eye(spatial + 1), "npy")


# ---------------------------------------------------------------------------- DICOM
def _float_list(dataset: Dataset, keyword: str) -> list[float] | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _float_value(dataset: Dataset, keyword: str) -> float | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _declared_pixels(dataset: Dataset, path: Path) -> tuple[tuple[int, ...], int]:
    """(frames, rows, columns, samples) and bytes per sample, from the header alone."""
    try:
        shape = (
            int(dataset.get("NumberOfFrames", 1) or 1),
            int(dataset.get("Rows", 0) or 0),
            int(dataset.get("Columns", 0) or 0),
            int(dataset.get("SamplesPerPixel", 1) or 1),
        )
        itemsize = max(int(dataset.get("BitsAllocated", 8) or 8) // 8, 1)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: the DICOM header has an invalid image size: {e}") from e
    return shape, itemsize


def _pixels(dataset: Dataset, path: Path, limits: _Limits | None = None) -> np.ndarray:
    """Rescaled pixels of one DICOM dataset as ``float64`` (frames, rows, cols[, samples]).

    With ``limits``, the size the header declares is checked before decoding.
    """
    if limits is not None:
        shape, itemsize = _declared_pixels(dataset, path)
        limits.check(path, shape, itemsize, "the DICOM header (frames x rows x columns x samples)")
    try:
        pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
    except Exception as e:  # missing PixelData, unsupported transfer syntax, truncated data
        raise DataError(f"{path}: cannot decode the DICOM pixel data: {e}") from e
    slope = _float_value(dataset, "RescaleSlope")
    intercept = _float_value(dataset, "RescaleIntercept")
    if slope is not None and slope != 1.0:
        pixels = pixels * slope
    if intercept is not None and intercept != 0.0:
        pixels = pixels + intercept
    samples = int(dataset.get("SamplesPerPixel", 1) or 1)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        pixels = pixels[np.newaxis]
    if samples == 1:
        pixels = pixels[..., np.newaxis]
    if pixels.ndim != 4:
        raise DataError(f"{path}: unexpected DICOM pixel array shape {pixels.shape}")
    return pixels


def _orientation(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row direction, column direction and slice normal (LPS), identity if not given."""
    cosines = _float_list(dataset, "ImageOrientationPatient")
    if cosines is None or len(cosines) != 6:
        row, column = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row, column = np.array(cosines[:3]), np.array(cosines[3:])
    normal = np.cross(row, column)
    return row, column, normal


def _pixel_spacing(dataset: Dataset) -> tuple[float, float]:
    """Spacing between columns (x) and between rows (y)."""
    spacing = _float_list(dataset, "PixelSpacing") or _float_list(dataset, "ImagerPixelSpacing")
    if spacing is None or len(spacing) != 2:
        return 1.0, 1.0
    row_spacing, column_spacing = spacing
    return column_spacing, row_spacing


def _slice_gap(dataset: Dataset) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float_value(dataset, keyword)
        if value is not None and value > 0:
            return value
    return 1.0


def _dicom_affine(
    dataset: Dataset, column_spacing: float, row_spacing: float, slice_step: np.ndarray
) -> np.ndarray:
    """Voxel (x = column, y = row, z = slice) to RAS+ world matrix."""
    row, column, _ = _orientation(dataset)
    origin = _float_list(dataset, "ImagePositionPatient")
    affine = np.eye(4)
    affine[:3, 0] = row * column_spacing
    affine[:3, 1] = column * row_spacing
    affine[:3, 2] = slice_step
    if origin is not None and len(origin) == 3:
        affine[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS (DICOM) -> RAS (NIfTI)


def _channel_first(volume: np.ndarray) -> np.ndarray:
    """(slices, rows, cols, samples) -> (samples, cols, rows, slices)."""
    return np.transpose(volume, (3, 2, 1, 0))


def _read_series_slices(folder: Path) -> list[tuple[Path, Dataset]]:
    slices: list[tuple[Path, Dataset]] = []
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.name.startswith(".") or file.name.upper() == "DICOMDIR":
            continue
        if not (file.name.lower().endswith(".dcm") or _has_dicm_preamble(file)):
            logger.debug("%s: skipping %s, not a DICOM file", folder, file.name)
            continue
        try:
            dataset = pydicom.dcmread(file, force=True)
        except Exception as e:  # InvalidDicomError, OSError, struct errors on truncated files
            raise DataError(f"{folder}: cannot read the DICOM file {file.name}: {e}") from e
        if "PixelData" not in dataset:
            logger.debug("%s: skipping %s, it has no pixel data", folder, file.name)
            continue
        slices.append((file, dataset))
    return slices


def _sort_slices(
    folder: Path, slices: list[tuple[Path, Dataset]]
) -> tuple[list[tuple[Path, Dataset]], float, np.ndarray]:
    """Slices in spatial order, the slice distance and the step vector between slices."""
    first = slices[0][1]
    _, _, normal = _orientation(first)
    positions = [_float_list(ds, "ImagePositionPatient") for _, ds in slices]
    if all(p is not None and len(p) == 3 for p in positions):
        points = np.array(positions, dtype=np.float64)
        along = points @ normal
        order = np.argsort(along, kind="stable")
        ordered = [slices[i] for i in order]
        along = along[order]
        if len(ordered) == 1:
            gap = _slice_gap(first)
            return ordered, gap, normal * gap
        gaps = np.diff(along)
        if np.any(gaps < _POSITION_TOLERANCE_MM):
            index = int(np.argmax(gaps < _POSITION_TOLERANCE_MM))
            raise DataError(
                f"{folder}: slices {ordered[index][0].name} and {ordered[index + 1][0].name} "
                f"are at the same position ({along[index]:.3f} mm along the slice normal); "
                "keep one series per folder"
            )
        gap = float(np.mean(gaps))
        if np.max(np.abs(gaps - gap)) > _UNIFORM_TOLERANCE * gap:
            logger.warning(
                "%s: slice gaps are not uniform (%.3f..%.3f mm); using their mean %.3f mm",
                folder,
                float(gaps.min()),
                float(gaps.max()),
                gap,
            )
        step = (points[order[-1]] - points[order[0]]) / (len(ordered) - 1)
        return ordered, gap, step
    numbers = [ds.get("InstanceNumber") for _, ds in slices]
    if all(n is not None and str(n) != "" for n in numbers):
        logger.warning(
            "%s: slices have no ImagePositionPatient; ordering them by InstanceNumber", folder
        )
        ordered = sorted(slices, key=lambda item: int(item[1].InstanceNumber))
    else:
        logger.warning(
            "%s: slices have neither ImagePositionPatient nor InstanceNumber; ordering them "
            "by file name",
            folder,
        )
        ordered = slices
    gap = _slice_gap(first)
    return ordered, gap, normal * gap


@dataclass(frozen=True)
class DicomImage:
    """A DICOM file or series whose headers :meth:`DicomReading.read` has checked and ordered.

    The pixel data is decoded by :meth:`DicomReading.get_data`.

    Attributes
    ----------
    path
        The DICOM file, or the folder of the series.
    slices
        ``(file, dataset)`` per file: one for a single file, the slices in spatial order for
        a series.
    series
        Whether ``path`` is a series folder.
    gap
        Slice distance of a series (mm); unused for a single file (its header has it).
    step
        World step between consecutive slices of a series (LPS, mm); unused for a file.
    """

    path: Path
    slices: tuple[tuple[Path, Dataset], ...]
    series: bool
    gap: float = 0.0
    step: np.ndarray = field(default_factory=lambda: np.zeros(3))


class DicomReading:
    """DICOM files and series folders behind MONAI's ``ImageReader`` interface.

    ``verify_suffix``, ``read`` and ``get_data`` are the methods of
    :class:`monai.data.ImageReader`; :class:`DicomReader` is this class as an actual MONAI
    reader (``LoadImage(reader=DicomReader())``), made on first use so that importing this
    module does not import MONAI. :func:`read_image` reads DICOM through these methods.

    Slices of a series are ordered by their position along the slice normal (MONAI's
    ``PydicomReader`` orders by ``InstanceNumber``), pixels are rescaled with
    ``RescaleSlope``/``RescaleIntercept`` and the array is channel-first ``float32`` in the
    layout of the module docstring. The size the headers declare is checked against the
    limits in :meth:`read`, before any pixel data is decoded.

    Parameters
    ----------
    max_voxels
        Largest number of voxels (all channels together) a file or series may declare.
    max_bytes
        Largest size of the declared voxel data, in bytes.
    """

    def __init__(self, max_voxels: int = MAX_IMAGE_VOXELS, max_bytes: int = MAX_IMAGE_BYTES):
        self._limits = _Limits(max_voxels, max_bytes)

    def verify_suffix(self, filename: Sequence[_PathLike] | _PathLike) -> bool:
        """Whether every name is a folder, a ``.dcm`` file or a file with a DICM preamble.

        Parameters
        ----------
        filename
            A path or a sequence of paths.
        """
        names = [filename] if isinstance(filename, str | os.PathLike) else list(filename)
        return bool(names) and all(
            Path(n).is_dir() or str(n).lower().endswith(".dcm") or _has_dicm_preamble(Path(n))
            for n in names
        )

    def read(
        self, data: Sequence[_PathLike] | _PathLike, **kwargs: Any
    ) -> DicomImage | list[DicomImage]:
        """Read and check the headers of a DICOM file or series folder (or several).

        Parameters
        ----------
        data
            A DICOM file or series folder, or a sequence of them (channels, as in MONAI's
            ``LoadImage``).
        kwargs
            Accepted for the interface; ignored.

        Returns
        -------
        DicomImage or list of DicomImage
            One per path; a single one for a single path.

        Raises
        ------
        DataError
            Naming the path: unreadable, not a DICOM image, over the limits, an empty folder
            or an inconsistent series.
        """
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        if not paths:
            raise DataError("no DICOM file or series folder given to read")
        images = [self._read_one(Path(p)) for p in paths]
        return images[0] if len(images) == 1 else images

    def get_data(self, img: DicomImage | Sequence[DicomImage]) -> tuple[np.ndarray, dict[str, Any]]:
        """Decode the pixels of what :meth:`read` returned.

        Parameters
        ----------
        img
            A :class:`DicomImage`, or several with the same spatial shape (stacked as
            channels).

        Returns
        -------
        array
            Channel-first ``float32`` array (``(C, X, Y)`` for a single-frame file, else
            ``(C, X, Y, Z)``).
        meta
            ``"spacing"``, ``"affine"`` (RAS+) and ``"format"`` (``"dicom"`` or
            ``"dicom-series"``) as :func:`read_image` returns them, and MONAI's
            ``"original_affine"``, ``"spatial_shape"``, ``"space"`` and
            ``"original_channel_dim"`` (0).

        Raises
        ------
        DataError
            The pixel data cannot be decoded, a series mixes slice sizes or multi-frame
            files, or the images to stack differ in spatial shape.
        """
        images = [img] if isinstance(img, DicomImage) else list(img)
        if not images:
            raise DataError("no DICOM image to decode: read() a file or series folder first")
        decoded = [_decode_series(i) if i.series else _decode_file(i) for i in images]
        array, meta = decoded[0]
        if len(decoded) > 1:
            shapes = {a.shape[1:] for a, _ in decoded}
            if len(shapes) > 1:
                listed = ", ".join(
                    f"{i.path} {_dims(a.shape[1:])}"
                    for i, (a, _) in zip(images, decoded, strict=True)
                )
                raise DataError(
                    f"DICOM images stacked as channels must have one spatial shape; got {listed}"
                )
            array = np.concatenate([a for a, _ in decoded], axis=0)
        affine = meta["affine"]
        return array, {
            **meta,
            "original_affine": affine.copy(),
            "spatial_shape": np.asarray(array.shape[1:]),
            "space": "RAS",
            "original_channel_dim": 0,
        }

    def _read_one(self, path: Path) -> DicomImage:
        if path.is_dir():
            return _read_series_headers(path, self._limits)
        if not path.exists():
            raise DataError(f"{path}: the file does not exist")
        try:
            dataset = pydicom.dcmread(path, force=path.name.lower().endswith(".dcm"))
        except Exception as e:  # InvalidDicomError, OSError, struct errors on truncated files
            raise DataError(f"{path}: cannot read the DICOM file: {e}") from e
        if "PixelData" not in dataset:
            raise DataError(f"{path}: not a DICOM image (no pixel data found)")
        shape, itemsize = _declared_pixels(dataset, path)
        self._limits.check(
            path, shape, itemsize, "the DICOM header (frames x rows x columns x samples)"
        )
        return DicomImage(path, ((path, dataset),), series=False)


def _decode_file(image: DicomImage) -> tuple[np.ndarray, dict[str, Any]]:
    """A single DICOM file (limits already checked) as a channel-first array and its meta."""
    path, dataset = image.slices[0]
    pixels = _pixels(dataset, path)
    column_spacing, row_spacing = _pixel_spacing(dataset)
    _, _, normal = _orientation(dataset)
    frames = pixels.shape[0]
    gap = _slice_gap(dataset)
    affine = _dicom_affine(dataset, column_spacing, row_spacing, normal * gap)
    volume = _channel_first(pixels)
    if frames == 1:
        array = volume[..., 0]
        spacing: tuple[float, ...] = (column_spacing, row_spacing)
        affine = _reduce_affine(affine, 2)
    else:
        array = volume
        spacing = (column_spacing, row_spacing, gap)
    return _as_float32(array, path), _meta(spacing, affine, "dicom")


def _read_series_headers(folder: Path, limits: _Limits) -> DicomImage:
    """The slices of a series folder, checked against ``limits`` and in spatial order."""
    try:
        slices = _read_series_slices(folder)
    except OSError as e:
        raise DataError(f"{folder}: cannot list the DICOM folder: {e.strerror or e}") from e
    if not slices:
        raise DataError(
            f"{folder}: the folder holds no DICOM image files (.dcm or files with a DICM preamble)"
        )
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in slices})
    if len(series) > 1:
        raise DataError(
            f"{folder}: the folder mixes {len(series)} DICOM series ({', '.join(series)}); "
            "keep one series per folder"
        )
    declared = [_declared_pixels(ds, file) for file, ds in slices]
    frames = sum(shape[0] for shape, _ in declared)
    rows = max(shape[1] for shape, _ in declared)
    columns = max(shape[2] for shape, _ in declared)
    samples = max(shape[3] for shape, _ in declared)
    limits.check(
        folder,
        (frames, rows, columns, samples),
        max(itemsize for _, itemsize in declared),
        f"the DICOM series ({len(slices)} file(s); slices x rows x columns x samples)",
    )
    ordered, gap, step = _sort_slices(folder, slices)
    return DicomImage(folder, tuple(ordered), series=True, gap=gap, step=step)


def _decode_series(image: DicomImage) -> tuple[np.ndarray, dict[str, Any]]:
    """The ordered slices of a series as a channel-first volume and its meta."""
    folder, ordered = image.path, image.slices
    planes: list[np.ndarray] = []
    for file, dataset in ordered:
        frame = _pixels(dataset, file)
        if frame.shape[0] != 1:
            raise DataError(
                f"{folder}: {file.name} is a multi-frame image; read it as a single file"
            )
        if planes and frame.shape[1:] != planes[0].shape:
            raise DataError(
                f"{folder}: {file.name} has {frame.shape[1]}x{frame.shape[2]} pixels "
                f"({frame.shape[3]} sample(s)) but {ordered[0][0].name} has "
                f"{planes[0].shape[0]}x{planes[0].shape[1]} ({planes[0].shape[2]}); keep one "
                "series per folder"
            )
        planes.append(frame[0])
    volume = _channel_first(np.stack(planes, axis=0))
    first = ordered[0][1]
    column_spacing, row_spacing = _pixel_spacing(first)
    affine = _dicom_affine(first, column_spacing, row_spacing, image.step)
    spacing = (column_spacing, row_spacing, image.gap)
    return _as_float32(volume, folder), _meta(spacing, affine, "dicom-series")


def _read_dicom(path: Path, limits: _Limits) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_image` for DICOM, through the reader interface; the meta of the docstring."""
    reader = DicomReading(limits.max_voxels, limits.max_bytes)
    image = reader.read(path)
    array, meta = reader.get_data(image)
    return array, {key: meta[key] for key in _META_KEYS}


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
