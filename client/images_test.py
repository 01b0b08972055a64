"""Tests of image reading: NIfTI, NumPy, DICOM file and series, and the errors."""

from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.errors import DataError
from client.images import read_image

SLOPE, INTERCEPT = 2.0, -1024.0
ROW_SPACING, COLUMN_SPACING, SLICE_GAP = 0.5, 0.7, 2.5


def _dicom_slice(
    path: Path,
    pixels: np.ndarray,
    *,
    z: float,
    series: str,
    instance: int,
) -> None:
    """Write one CT slice (rows x cols int16 stored values) with pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelSpacing = [ROW_SPACING, COLUMN_SPACING]
    ds.SliceThickness = SLICE_GAP
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, 20.0, z]
    ds.InstanceNumber = instance
    ds.RescaleSlope = SLOPE
    ds.RescaleIntercept = INTERCEPT
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_nifti_volume_gets_one_channel_spacing_and_affine(tmp_path: Path) -> None:
    # Prepare: a 3x4x5 volume with spacing 2, 3, 4 mm
    volume = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = [1.0, 2.0, 3.0]
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    # Execute
    array, meta = read_image(path)
    # Assert
    assert array.shape == (1, 3, 4, 5)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array[0], volume)
    assert meta["spacing"] == (2.0, 3.0, 4.0)
    np.testing.assert_allclose(meta["affine"], affine)
    assert meta["affine"].dtype == np.float64


def test_nifti_4d_moves_channels_first(tmp_path: Path) -> None:
    # Prepare: two channels stored last, as NIfTI does
    volume = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)
    path = tmp_path / "mr.nii"
    nib.save(nib.Nifti1Image(volume, np.diag([1.5, 1.5, 3.0, 1.0])), str(path))
    # Execute
    array, meta = read_image(path)
    # Assert
    assert array.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(array[1], volume[..., 1], rtol=1e-6)
    assert meta["spacing"] == (1.5, 1.5, 3.0)


def test_npy_2d_and_3d_get_one_channel_identity_geometry(tmp_path: Path) -> None:
    # Prepare
    volume = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    image = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.save(tmp_path / "v.npy", volume)
    np.save(tmp_path / "i.npy", image)
    # Execute
    array3, meta3 = read_image(tmp_path / "v.npy")
    array2, meta2 = read_image(str(tmp_path / "i.npy"))
    # Assert
    assert array3.shape == (1, 2, 3, 4) and array3.dtype == np.float32
    np.testing.assert_array_equal(array3[0], volume)
    assert meta3["spacing"] == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(meta3["affine"], np.eye(4))
    assert array2.shape == (1, 2, 3)
    assert meta2["spacing"] == (1.0, 1.0)
    np.testing.assert_array_equal(meta2["affine"], np.eye(3))


def test_npy_with_objects_is_refused(tmp_path: Path) -> None:
    # Prepare: a pickled object array
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    # Execute / Assert
    with pytest.raises(DataError, match=r"objects\.npy"):
        read_image(path)


def test_single_dicom_file_is_rescaled_and_laid_out_like_nifti(tmp_path: Path) -> None:
    # Prepare: one 4x5 slice (rows x cols) of stored values
    stored = np.arange(20, dtype=np.int16).reshape(4, 5)
    path = tmp_path / "slice.dcm"
    _dicom_slice(path, stored, z=0.0, series=generate_uid(), instance=1)
    # Execute
    array, meta = read_image(path)
    # Assert: x runs along a row (columns), y along a column (rows)
    assert array.shape == (1, 5, 4)
    np.testing.assert_array_equal(array[0], stored.T * SLOPE + INTERCEPT)
    assert meta["spacing"] == (COLUMN_SPACING, ROW_SPACING)
    assert meta["affine"].shape == (3, 3)
    assert meta["format"] == "dicom"


def test_dicom_file_without_extension_is_found_by_its_preamble(tmp_path: Path) -> None:
    # Prepare
    stored = np.full((2, 3), 7, dtype=np.int16)
    path = tmp_path / "IM0001"
    _dicom_slice(path, stored, z=0.0, series=generate_uid(), instance=1)
    # Execute
    array, _ = read_image(path)
    # Assert
    np.testing.assert_array_equal(array, np.full((1, 3, 2), 7 * SLOPE + INTERCEPT))


def test_dicom_series_is_sorted_by_position_and_rescaled(tmp_path: Path) -> None:
    # Prepare: a (rows=4, cols=5, slices=6) volume written in shuffled order, with
    # instance numbers reversed so that only the positions give the right order
    stored = np.random.default_rng(1).integers(-500, 1500, size=(4, 5, 6)).astype(np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    series = generate_uid()
    order = list(range(6))
    random.Random(3).shuffle(order)
    for k in order:
        _dicom_slice(
            folder / f"slice-{order.index(k):02d}.dcm",
            stored[:, :, k],
            z=100.0 + SLICE_GAP * k,
            series=series,
            instance=6 - k,
        )
    (folder / "README.txt").write_text("not a DICOM file")
    # Execute
    array, meta = read_image(folder)
    # Assert
    expected = np.transpose(stored, (1, 0, 2)) * SLOPE + INTERCEPT  # (cols, rows, slices)
    assert array.shape == (1, 5, 4, 6)
    np.testing.assert_array_equal(array[0], expected)
    assert meta["spacing"] == pytest.approx((COLUMN_SPACING, ROW_SPACING, SLICE_GAP))
    affine = meta["affine"]
    assert affine.shape == (4, 4)
    # voxel (0, 0, 0) is the first slice's position, in RAS (x and y of LPS negated)
    np.testing.assert_allclose(affine[:3, 3], [10.0, -20.0, 100.0])
    np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), [COLUMN_SPACING, ROW_SPACING, 2.5])
    assert meta["format"] == "dicom-series"


def test_dicom_series_mixing_two_series_is_refused(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(2):
        _dicom_slice(
            folder / f"{i}.dcm",
            np.zeros((2, 2), np.int16),
            z=float(i),
            series=generate_uid(),
            instance=i,
        )
    # Execute / Assert
    with pytest.raises(DataError, match="2 DICOM series"):
        read_image(folder)


def test_empty_dicom_folder_names_the_folder(tmp_path: Path) -> None:
    # Prepare
    folder = tmp_path / "empty-series"
    folder.mkdir()
    (folder / "notes.txt").write_text("nothing here")
    # Execute / Assert
    with pytest.raises(DataError, match=r"empty-series.*no DICOM"):
        read_image(folder)


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "scan.mha"
    path.write_bytes(b"\0" * 200)
    # Execute
    with pytest.raises(DataError) as caught:
        read_image(path)
    # Assert
    message = str(caught.value)
    assert str(path) in message
    assert "'.mha'" in message
    assert ".nii.gz" in message and ".npy" in message and ".dcm" in message


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nii", "broken.npy", "broken.dcm"])
def test_corrupt_file_raises_data_error_naming_it(tmp_path: Path, name: str) -> None:
    # Prepare
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 3)
    # Execute / Assert
    with pytest.raises(DataError) as caught:
        read_image(path)
    assert str(path) in str(caught.value)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "absent.nii.gz")
