"""Tests of image reading: NIfTI, NumPy, DICOM file and series, and the errors."""

from __future__ import annotations

import gzip
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.errors import DataError
from client.images import MAX_IMAGE_VOXELS, read_image

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


# ---------------------------------------------------------------------------- size limits
def _nifti_header_only(path: Path, shape: tuple[int, ...], *, compress: bool) -> None:
    """A NIfTI file whose header declares ``shape`` (float32) but holds no voxel data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    path.write_bytes(gzip.compress(raw, 9) if compress else raw)


def test_tiny_nifti_declaring_720_cubed_is_refused_before_reading(tmp_path: Path) -> None:
    # Prepare: a ~60-byte .nii.gz whose header declares 720^3 float32 voxels (1.4 GiB)
    path = tmp_path / "bomb.nii.gz"
    _nifti_header_only(path, (720, 720, 720), compress=True)
    assert path.stat().st_size < 100
    # Execute
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DataError) as caught:
            read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    # Assert: names the file, the declared shape and the limit; nothing large allocated
    message = str(caught.value)
    assert str(path) in message
    assert "720x720x720" in message
    assert f"{MAX_IMAGE_VOXELS:,} voxels" in message
    assert peak < 16 << 20, peak
    assert elapsed < 1.0


def test_nifti_declaring_more_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    # Prepare: 200^3 is within the limits, but the files hold no voxel data
    plain = tmp_path / "short.nii"
    _nifti_header_only(plain, (200, 200, 200), compress=False)
    packed = tmp_path / "short.nii.gz"
    _nifti_header_only(packed, (200, 200, 200), compress=True)
    # Execute / Assert
    with pytest.raises(DataError, match=r"short\.nii: .*the file has only 352 bytes; .*truncated"):
        read_image(plain)
    with pytest.raises(DataError, match=r"short\.nii\.gz: .*cannot expand to that much"):
        read_image(packed)


def test_image_limits_are_configurable(tmp_path: Path) -> None:
    # Prepare: an ordinary 3x4x5 volume (60 voxels)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 4, 5), np.float32), np.eye(4)), str(path))
    # Execute / Assert: refused under a lower limit, read under the default
    with pytest.raises(DataError, match=r"3x4x5 = 60 voxels .* limit of 59 voxels"):
        read_image(path, max_voxels=59)
    with pytest.raises(DataError, match=r"limit of .* and 100 bytes"):
        read_image(path, max_bytes=100)
    assert read_image(path, max_voxels=60)[0].shape == (1, 3, 4, 5)


def test_npy_header_declaring_a_huge_or_missing_array_is_refused(tmp_path: Path) -> None:
    # Prepare: headers only; one declares 720^3 float32, one 10^3 with 8 bytes of data
    huge, short = tmp_path / "huge.npy", tmp_path / "short.npy"
    for path, shape in ((huge, (720, 720, 720)), (short, (10, 10, 10))):
        with path.open("wb") as handle:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            handle.write(b"\0" * 8)
    # Execute / Assert
    with pytest.raises(DataError, match=r"huge\.npy: the NumPy header declares shape 720x720x720"):
        read_image(huge)
    with pytest.raises(DataError, match=r"short\.npy: .*truncated"):
        read_image(short)


def test_dicom_declaring_huge_frames_is_refused_before_decoding(tmp_path: Path) -> None:
    # Prepare: a valid slice, then its header claims 1000 frames of 4096x4096
    path = tmp_path / "huge.dcm"
    _dicom_slice(path, np.zeros((4, 4), np.int16), z=0.0, series="1.2.3", instance=1)
    dataset = pydicom.dcmread(path)
    dataset.Rows = dataset.Columns = 4096
    dataset.NumberOfFrames = 1000
    dataset.save_as(path)
    # Execute / Assert
    with pytest.raises(DataError, match=r"huge\.dcm: the DICOM header .* 1000x4096x4096x1"):
        read_image(path)


def test_dicom_series_over_the_limit_names_the_folder(tmp_path: Path) -> None:
    # Prepare: 3 slices of 4x4 (48 voxels)
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(3):
        pixels = np.zeros((4, 4), np.int16)
        _dicom_slice(folder / f"{i}.dcm", pixels, z=float(i), series="1.2.3", instance=i + 1)
    # Execute / Assert
    with pytest.raises(DataError, match=r"series: the DICOM series \(3 file\(s\).*3x4x4x1"):
        read_image(folder, max_voxels=47)
    assert read_image(folder, max_voxels=48)[0].shape == (1, 4, 4, 3)


# ---------------------------------------------------------------------------- MONAI reader
def _series(folder: Path, stored: np.ndarray) -> None:
    """Write ``stored`` (rows x cols x slices) as a series, slices in reverse file order."""
    folder.mkdir()
    series = generate_uid()
    slices = stored.shape[2]
    for k in range(slices):
        _dicom_slice(
            folder / f"{slices - k:02d}.dcm",
            stored[:, :, k],
            z=50.0 + SLICE_GAP * k,
            series=series,
            instance=k + 1,
        )


def test_dicom_reader_serves_monai_load_image(tmp_path: Path) -> None:
    # Prepare: a (rows=3, cols=4, slices=5) series
    from monai.data import ImageReader, MetaTensor
    from monai.transforms import LoadImage, LoadImaged

    from client.images import DicomReader

    stored = np.random.default_rng(2).integers(-100, 900, size=(3, 4, 5)).astype(np.int16)
    folder = tmp_path / "series"
    _series(folder, stored)
    expected, meta = read_image(folder)
    # Execute
    image = LoadImage(reader=DicomReader(), image_only=True)(folder)
    first = LoadImage(reader=DicomReader(), image_only=True, ensure_channel_first=True)(folder)
    item = LoadImaged(keys="ct", reader=DicomReader())({"ct": str(folder)})
    # Assert: the same voxels and geometry as read_image, channel first
    assert issubclass(DicomReader, ImageReader)
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, 4, 3, 5)
    np.testing.assert_array_equal(image.numpy(), expected)
    np.testing.assert_array_equal(first.numpy(), expected)
    np.testing.assert_array_equal(item["ct"].numpy(), expected)
    np.testing.assert_allclose(image.affine.numpy(), meta["affine"])
    np.testing.assert_allclose(image.pixdim.numpy(), [COLUMN_SPACING, ROW_SPACING, SLICE_GAP])
    np.testing.assert_allclose(image.affine[:3, 3].numpy(), [10.0, -20.0, 50.0])
    assert image.meta["filename_or_obj"] == str(folder)
    assert image.meta["format"] == "dicom-series"
    assert list(image.meta["spatial_shape"]) == [4, 3, 5]


def test_dicom_reader_interface_suffixes_limits_and_channels(tmp_path: Path) -> None:
    # Prepare: two series of the same size, one of another size, a single file, a NIfTI
    from client.images import DicomReading

    stored = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    _series(tmp_path / "a", stored)
    _series(tmp_path / "b", stored + 1)
    _series(tmp_path / "small", stored[:, :, :2])
    _dicom_slice(tmp_path / "IM1", stored[:, :, 0], z=0.0, series=generate_uid(), instance=1)
    nifti = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), nifti)
    reader = DicomReading()
    # Execute
    both, meta = reader.get_data(reader.read([tmp_path / "a", tmp_path / "b"]))
    single, single_meta = reader.get_data(reader.read(str(tmp_path / "IM1")))
    # Assert
    assert reader.verify_suffix(tmp_path / "a")
    assert reader.verify_suffix([str(tmp_path / "IM1"), tmp_path / "b"])  # DICM preamble
    assert reader.verify_suffix("missing.DCM")
    assert not reader.verify_suffix(nifti)
    assert not reader.verify_suffix([tmp_path / "a", nifti])
    assert both.shape == (2, 3, 2, 4) and both.dtype == np.float32
    np.testing.assert_array_equal(both[1] - both[0], np.full((3, 2, 4), SLOPE))
    assert meta["original_channel_dim"] == 0
    assert meta["space"] == "RAS"
    np.testing.assert_array_equal(meta["original_affine"], meta["affine"])
    assert single.shape == (1, 3, 2)
    assert single_meta["format"] == "dicom"
    assert single_meta["spacing"] == (COLUMN_SPACING, ROW_SPACING)
    with pytest.raises(DataError, match="one spatial shape"):
        reader.get_data(reader.read([tmp_path / "a", tmp_path / "small"]))
    # limits are checked in read(), on the headers, before any pixel data is decoded
    with pytest.raises(DataError, match=r"a: the DICOM series \(4 file\(s\).*4x2x3x1"):
        DicomReading(max_voxels=23).read(tmp_path / "a")
    assert DicomReading(max_voxels=24).read(tmp_path / "a").slices[0][0].name == "04.dcm"


def test_importing_images_does_not_import_monai() -> None:
    code = (
        "import sys, client.images as m; print('monai' in sys.modules); "
        "m.DicomReader; print('monai' in sys.modules, m.DicomReader.__qualname__)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert completed.stdout.split() == ["False", "True", "DicomReader"]
