"""DICOM files and series folders behind MONAI's ``ImageReader`` interface.

:class:`DicomReading` checks the headers in :meth:`~DicomReading.read` (size limits, one
series per folder, slice order) and decodes the pixels in :meth:`~DicomReading.get_data`;
:func:`client.images.read_image` reads DICOM through it (:func:`read_dicom`), and
:class:`client.images.DicomReader` is the same reader as a MONAI subclass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from client.dicom_series import (
    DicomImage,
    declared_pixels,
    decode_file,
    decode_series,
    read_series_headers,
)
from client.errors import DataError
from client.image_common import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_VOXELS,
    Limits,
    dims_text,
    has_dicm_preamble,
)

_PathLike = str | os.PathLike[Any]
_META_KEYS = ("spacing", "affine", "format")
"""The meta keys :func:`client.images.read_image` returns."""


class DicomReading:
    """DICOM files and series folders behind MONAI's ``ImageReader`` interface.

    ``verify_suffix``, ``read`` and ``get_data`` are the methods of
    :class:`monai.data.ImageReader`; :class:`client.images.DicomReader` is this class as an
    actual MONAI reader (``LoadImage(reader=DicomReader())``), made on first use so that
    importing :mod:`client.images` does not import MONAI. :func:`~client.images.read_image`
    reads DICOM through these methods.

    Slices of a series are ordered by their position along the slice normal (MONAI's
    ``PydicomReader`` orders by ``InstanceNumber``), pixels are rescaled with
    ``RescaleSlope``/``RescaleIntercept`` and the array is channel-first ``float32`` in the
    layout of :mod:`client.images`. The size the headers declare is checked against the
    limits in :meth:`read`, before any pixel data is decoded.

    Parameters
    ----------
    max_voxels
        Largest number of voxels (all channels together) a file or series may declare.
    max_bytes
        Largest size of the declared voxel data, in bytes.
    """

    def __init__(self, max_voxels: int = MAX_IMAGE_VOXELS, max_bytes: int = MAX_IMAGE_BYTES):
        self._limits = Limits(max_voxels, max_bytes)

    def verify_suffix(self, filename: Sequence[_PathLike] | _PathLike) -> bool:
        """Whether every name is a folder, a ``.dcm`` file or a file with a DICM preamble.

        Parameters
        ----------
        filename
            A path or a sequence of paths.
        """
        names = [filename] if isinstance(filename, str | os.PathLike) else list(filename)
        return bool(names) and all(
            Path(n).is_dir() or str(n).lower().endswith(".dcm") or has_dicm_preamble(Path(n))
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
            ``"dicom-series"``) as :func:`~client.images.read_image` returns them, and MONAI's
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
        decoded = [decode_series(i) if i.series else decode_file(i) for i in images]
        array, meta = decoded[0]
        if len(decoded) > 1:
            shapes = {a.shape[1:] for a, _ in decoded}
            if len(shapes) > 1:
                listed = ", ".join(
                    f"{i.path} {dims_text(a.shape[1:])}"
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
            return read_series_headers(path, self._limits)
        if not path.exists():
            raise DataError(f"{path}: the file does not exist")
        try:
            dataset = pydicom.dcmread(path, force=path.name.lower().endswith(".dcm"))
        except Exception as e:  # InvalidDicomError, OSError, struct errors on truncated files
            raise DataError(f"{path}: cannot read the DICOM file: {e}") from e
        if "PixelData" not in dataset:
            raise DataError(f"{path}: not a DICOM image (no pixel data found)")
        shape, itemsize = declared_pixels(dataset, path)
        self._limits.check(
            path, shape, itemsize, "the DICOM header (frames x rows x columns x samples)"
        )
        return DicomImage(path, ((path, dataset),), series=False)


def read_dicom(path: Path, limits: Limits) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`~client.images.read_image` for DICOM, through the reader interface.

    Returns the array and the meta keys ``read_image`` documents (no MONAI keys).
    """
    reader = DicomReading(limits.max_voxels, limits.max_bytes)
    image = reader.read(path)
    array, meta = reader.get_data(image)
    return array, {key: meta[key] for key in _META_KEYS}
