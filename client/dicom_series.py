"""DICOM headers and pixels: slice geometry, series ordering and decoding into volumes.

Used by :class:`client.dicom_reader.DicomReading`. Pixels are rescaled with
``RescaleSlope``/``RescaleIntercept`` and laid out like NIfTI (first spatial axis along a
row, second along a column, third across slices); the slices of a series are ordered by
their position along the slice normal, falling back to ``InstanceNumber``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from client.errors import DataError
from client.image_common import (
    Limits,
    as_float32,
    has_dicm_preamble,
    image_meta,
    reduce_affine,
)

logger = logging.getLogger(__name__)

_POSITION_TOLERANCE_MM = 1e-3
"""Slices closer than this along the normal are taken as the same position."""
_UNIFORM_TOLERANCE = 0.05
"""Relative deviation of slice gaps above which a series is reported as non-uniform."""


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


def declared_pixels(dataset: Dataset, path: Path) -> tuple[tuple[int, ...], int]:
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


def _pixels(dataset: Dataset, path: Path, limits: Limits | None = None) -> np.ndarray:
    """Rescaled pixels of one DICOM dataset as ``float64`` (frames, rows, cols[, samples]).

    With ``limits``, the size the header declares is checked before decoding.
    """
    if limits is not None:
        shape, itemsize = declared_pixels(dataset, path)
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
        if not (file.name.lower().endswith(".dcm") or has_dicm_preamble(file)):
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


def decode_file(image: DicomImage) -> tuple[np.ndarray, dict[str, Any]]:
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
        affine = reduce_affine(affine, 2)
    else:
        array = volume
        spacing = (column_spacing, row_spacing, gap)
    return as_float32(array, path), image_meta(spacing, affine, "dicom")


def read_series_headers(folder: Path, limits: Limits) -> DicomImage:
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
    declared = [declared_pixels(ds, file) for file, ds in slices]
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


def decode_series(image: DicomImage) -> tuple[np.ndarray, dict[str, Any]]:
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
    return as_float32(volume, folder), image_meta(spacing, affine, "dicom-series")
