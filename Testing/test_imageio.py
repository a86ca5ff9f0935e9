"""Reading CT files and DICOM series with their geometry; canonical orientation and the exact way back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path

from CovidInfectionSegLib.imageio import from_canonical, read_image, to_canonical
from CovidInfectionSegLib.validation import InputError

LPS = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def oblique_direction() -> tuple[float, ...]:
    """Rotated 20 degrees about z and 10 about x, then axes permuted (a sagittal-ish oblique acquisition)."""
    a, b = math.radians(20), math.radians(10)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    permute = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]])  # index axes -> patient axes, flipped
    return tuple((rz @ rx @ permute).ravel())


def make_image(direction=LPS, size=(12, 10, 9), spacing=(0.7, 0.8, 2.5), origin=(10.0, -20.0, 30.0)) -> sitk.Image:
    values = np.arange(np.prod(size), dtype=np.int16).reshape(size[::-1])
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def assert_same_geometry(image: sitk.Image, reference: sitk.Image, exact: bool = True) -> None:
    assert image.GetSize() == reference.GetSize()
    if exact:
        assert image.GetSpacing() == reference.GetSpacing()
        assert image.GetOrigin() == reference.GetOrigin()
        assert image.GetDirection() == reference.GetDirection()
    else:
        np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"])
def test_read_file_formats_keep_voxels_and_geometry(tmp_path: Path, suffix: str) -> None:
    image = make_image(RAS)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(image, str(path))
    loaded = read_image(path)
    assert_same_geometry(loaded, image, exact=False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), sitk.GetArrayFromImage(image))


def test_read_real_abdominal_dicom_series_geometry() -> None:
    image = read_image(shared_path("example-abdominal-ct", "dicom"))
    assert image.GetSize() == (512, 512, 20)
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0), rtol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), LPS, atol=1e-6)
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() == -1024 and array.max() == 1839  # HU (rescale applied), as the data README says


def test_read_real_abdominal_nifti_geometry() -> None:
    image = read_image(shared_path("example-abdominal-ct", "example_ct.nii.gz"))
    assert image.GetSize() == (122, 101, 112)
    np.testing.assert_allclose(image.GetSpacing(), (3.0, 3.0, 3.0))
    np.testing.assert_allclose(image.GetDirection(), RAS, atol=1e-6)  # RAS storage, LPS physical space


def test_read_real_chest_ct() -> None:
    image = read_image(shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-B.nii.gz"))
    assert image.GetSize() == (512, 512, 64)
    np.testing.assert_allclose(image.GetSpacing(), (0.842, 0.842, 5.0), atol=1e-3)
    canonical = to_canonical(image)
    np.testing.assert_allclose(canonical.GetDirection(), LPS, atol=1e-6)


def write_dicom_series(folder: Path, series_uid: str, slices: int, value: int) -> None:
    """A small CT DICOM series written with SimpleITK (one file per slice)."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for index in range(slices):
        slice_image = sitk.GetImageFromArray(np.full((1, 16, 16), value + index, dtype=np.int16))
        slice_image.SetSpacing((0.8, 0.8, 2.0))
        slice_image.SetOrigin((0.0, 0.0, 2.0 * index))
        for tag, tag_value in {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(index + 1),
            "0020|0032": f"0\\0\\{2.0 * index}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{index + 1}",
        }.items():
            slice_image.SetMetaData(tag, tag_value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{index:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_folder_with_several_series_reads_the_largest_and_says_so(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study", "1.2.826.0.1.3680043.2.1125.101", slices=9, value=100)
    write_dicom_series(tmp_path / "study", "1.2.826.0.1.3680043.2.1125.202", slices=12, value=500)
    warnings: list[str] = []
    image = read_image(tmp_path / "study", warnings)
    assert image.GetSize() == (16, 16, 12)
    assert sitk.GetArrayViewFromImage(image)[0, 0, 0] == 500
    assert len(warnings) == 1 and "2 DICOM series" in warnings[0] and "202 (12 files)" in warnings[0]


def test_single_dcm_file_reads_its_series(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "study", "1.2.826.0.1.3680043.2.1125.101", slices=9, value=100)
    write_dicom_series(tmp_path / "study", "1.2.826.0.1.3680043.2.1125.202", slices=12, value=500)
    image = read_image(tmp_path / "study" / "101_003.dcm")
    assert image.GetSize() == (16, 16, 9)


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothere\.nii\.gz: no such file or folder"):
        read_image(tmp_path / "nothere.nii.gz")


def test_empty_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.touch()
    with pytest.raises(InputError, match=r"empty\.nii\.gz: file is empty \(0 bytes\)"):
        read_image(path)


def test_damaged_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "damaged.nrrd"
    path.write_bytes(b"this is not an image" * 20)
    with pytest.raises(InputError, match=r"damaged\.nrrd: cannot be read"):
        read_image(path)


def test_unsupported_format_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"\x00\x01" * 50)
    with pytest.raises(InputError, match=r"scan\.xyz: unsupported or unreadable file.*DICOM series folder"):
        read_image(path)


def test_folder_without_dicom_is_reported(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series found"):
        read_image(tmp_path)


@pytest.mark.parametrize("direction", [LPS, RAS, oblique_direction()], ids=["LPS", "RAS", "oblique"])
def test_to_canonical_keeps_every_voxel_at_its_physical_point(direction) -> None:
    image = make_image(direction)
    canonical = to_canonical(image)
    original = sitk.GetArrayViewFromImage(image)
    values = sitk.GetArrayViewFromImage(canonical)
    for index in [(0, 0, 0), (11, 9, 8), (3, 7, 2), (5, 0, 6)]:
        point = image.TransformIndexToPhysicalPoint(index)
        canonical_index = canonical.TransformPhysicalPointToIndex(point)
        assert values[canonical_index[::-1]] == original[index[::-1]]
    # canonical axes point toward patient left, posterior, superior (closest axis of an oblique grid)
    assert np.all(np.diag(np.asarray(canonical.GetDirection()).reshape(3, 3)) > 0.8)


def test_canonical_array_shows_anterior_at_top_and_patient_right_on_the_left() -> None:
    image = sitk.GetImageFromArray(np.zeros((10, 20, 20), dtype=np.int16))
    image.SetDirection(RAS)  # index x grows toward patient right, index y toward anterior
    image[19, 19, 5] = 1  # so this voxel is the most right and most anterior
    right_anterior = image.TransformIndexToPhysicalPoint((19, 19, 5))
    canonical = to_canonical(image)
    z, row, col = np.argwhere(sitk.GetArrayViewFromImage(canonical) == 1)[0]
    assert (row, col) == (0, 0)  # top row (anterior), first column (patient right)
    np.testing.assert_allclose(canonical.TransformIndexToPhysicalPoint((int(col), int(row), int(z))), right_anterior)


@pytest.mark.parametrize("direction", [LPS, RAS, oblique_direction()], ids=["LPS", "RAS", "oblique"])
def test_from_canonical_round_trip_lands_labels_at_the_same_physical_point(direction) -> None:
    reference = make_image(direction)
    canonical = to_canonical(reference)
    labels = np.zeros(sitk.GetArrayViewFromImage(canonical).shape, dtype=np.uint8)
    depth, rows, cols = labels.shape
    labelled = [(0, 0, 0), (depth - 1, rows - 1, cols - 1), (depth // 2, 1, cols - 2)]  # (z, y, x), canonical
    for value, index in enumerate(labelled, start=1):
        labels[index] = value
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(canonical)

    restored = from_canonical(label_image, reference)

    assert_same_geometry(restored, reference, exact=True)
    restored_array = sitk.GetArrayViewFromImage(restored)
    assert np.count_nonzero(restored_array) == len(labelled)
    for value, (z, y, x) in enumerate(labelled, start=1):
        point = canonical.TransformIndexToPhysicalPoint((x, y, z))
        rx, ry, rz = reference.TransformPhysicalPointToIndex(point)
        assert restored_array[rz, ry, rx] == value


def test_an_image_already_in_lps_is_not_copied() -> None:
    lps = sitk.Image([4, 5, 6], sitk.sitkInt16)
    assert to_canonical(lps) is lps
    ras = sitk.DICOMOrient(lps, "RAS")
    assert to_canonical(ras) is not ras
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(to_canonical(ras).GetDirection()) == "LPS"
