"""Damaged inputs through the real readers: truncations, flipped bytes, NaN in every format, broken DICOM
series. Each one is an error that says what is wrong, never a volume with silent zeros."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from phantoms import chest_phantom
from shared_data import shared_path

from CovidInfectionSegLib.cli import EXIT_USAGE, main
from CovidInfectionSegLib.imageio import clean_native_messages, read_image
from CovidInfectionSegLib.integrity import verify_image_file
from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.pipeline import segment_file
from CovidInfectionSegLib.validation import InputError

# (file name, compressed, the file holding the voxel data)
FORMATS = [
    ("ct.nii", False, "ct.nii"),
    ("ct.nii.gz", True, "ct.nii.gz"),
    ("ct.nrrd", False, "ct.nrrd"),
    ("ct.nrrd", True, "ct.nrrd"),
    ("ct.nhdr", False, "ct.raw"),
    ("ct.nhdr", True, "ct.raw.gz"),
    ("ct.mha", False, "ct.mha"),
    ("ct.mha", True, "ct.mha"),
    ("ct.mhd", False, "ct.raw"),
    ("ct.mhd", True, "ct.zraw"),
]
FORMAT_IDS = [f"{name}{'-compressed' if compressed else ''}" for name, compressed, _data in FORMATS]
CUTS = [0.3, 0.6, 0.9, 0.999]


def phantom_image() -> sitk.Image:
    return chest_phantom(shape=(16, 64, 64)).image()


def write(image: sitk.Image, folder: Path, name: str, compressed: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    sitk.WriteImage(image, str(path), useCompression=compressed)
    return path


def data_region(path: Path, data_file: Path) -> tuple[int, int]:
    """Byte range of the voxel data in ``data_file`` (after the header when it is the same file)."""
    size = data_file.stat().st_size
    if data_file != path or path.suffix == ".gz":
        return (0, size) if path.suffix != ".gz" else (20, size)
    raw = data_file.read_bytes()
    if path.suffix == ".nii":
        return 352, size
    marker = b"\n\n" if path.suffix == ".nrrd" else b"ElementDataFile = LOCAL\n"
    return raw.index(marker) + len(marker), size


@pytest.mark.parametrize("name, compressed, data_name", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("cut", CUTS)
def test_truncated_file_is_an_error_that_says_so(tmp_path, name, compressed, data_name, cut):
    path = write(phantom_image(), tmp_path, name, compressed)
    data_file = tmp_path / data_name
    start, end = data_region(path, data_file)
    keep = start + int((end - start) * cut)
    data_file.write_bytes(data_file.read_bytes()[:keep])
    with pytest.raises(InputError, match=r"truncated|damaged") as caught:
        read_image(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("name, compressed, data_name", FORMATS, ids=FORMAT_IDS)
def test_file_cut_inside_its_header_is_an_error(tmp_path, name, compressed, data_name):
    path = write(phantom_image(), tmp_path, name, compressed)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(InputError, match=rf"{name}"):
        read_image(path)


def test_when_the_check_and_the_reader_both_fail_the_check_says_why(tmp_path):
    """The integrity check runs beside the reader; a gzip stream cut inside the NIfTI header makes both
    fail, and the message is the check's (what is wrong with the file), not the reader's."""
    path = write(phantom_image(), tmp_path, "scan.nii.gz", True)
    path.write_bytes(path.read_bytes()[:40])
    warnings: list[str] = []
    with pytest.raises(InputError, match=r"truncated") as caught:
        read_image(path, warnings)
    assert "cannot be read" not in str(caught.value) and warnings == []


COMPRESSED = [entry for entry in FORMATS if entry[1]]


@pytest.mark.parametrize("name, compressed, data_name", COMPRESSED, ids=[f"{n}-compressed" for n, _c, _d in COMPRESSED])
@pytest.mark.parametrize("where", [0.25, 0.5, 0.75, 0.98])
def test_flipped_byte_in_compressed_data_is_an_error(tmp_path, name, compressed, data_name, where):
    path = write(phantom_image(), tmp_path, name, compressed)
    data_file = tmp_path / data_name
    start, end = data_region(path, data_file)
    damaged = bytearray(data_file.read_bytes())
    damaged[start + int((end - start) * where)] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match=r"damaged|truncated|cannot be read"):
        read_image(path)


UNCOMPRESSED = [entry for entry in FORMATS if not entry[1]]


@pytest.mark.parametrize("name, compressed, data_name", UNCOMPRESSED, ids=[n for n, _c, _d in UNCOMPRESSED])
def test_flipped_byte_in_uncompressed_voxels_cannot_be_found(tmp_path, name, compressed, data_name):
    """The documented limit: these formats have no checksum, so the changed voxel is read as it is."""
    image = phantom_image()
    path = write(image, tmp_path, name, compressed)
    data_file = tmp_path / data_name
    start, end = data_region(path, data_file)
    damaged = bytearray(data_file.read_bytes())
    offset = start + 2 * ((end - start) // 4)  # a voxel's low byte, int16
    damaged[offset] ^= 0xFF
    data_file.write_bytes(bytes(damaged))
    changed = sitk.GetArrayFromImage(read_image(path)) != sitk.GetArrayFromImage(image)
    assert np.count_nonzero(changed) == 1


def image_with_nan(dtype: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.Cast(phantom_image(), dtype)
    array = sitk.GetArrayFromImage(image)
    array[5, 20, 20] = np.nan
    array[9, 30, 30] = np.inf
    array[10, 31, 30] = -np.inf
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(image)
    return result


@pytest.mark.parametrize("name, compressed, data_name", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", [sitk.sitkFloat32, sitk.sitkFloat64], ids=["float32", "float64"])
def test_nan_and_inf_are_found_in_every_format(tmp_path, tiny_model_manifest, name, compressed, data_name, dtype):
    path = write(image_with_nan(dtype), tmp_path, name, compressed)
    with pytest.raises(InputError, match=r"3 voxels are NaN or infinite"):
        segment_file(path, load_model_package(tiny_model_manifest), device="cpu")


def test_nifti_check_streams_big_endian_and_float64(tmp_path):
    import nibabel

    array = np.zeros((10, 12, 14), dtype=">f8")
    array[3, 4, 5] = np.nan
    path = tmp_path / "big_endian.nii.gz"
    nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), str(path))
    with pytest.raises(InputError, match="1 voxels are NaN"):
        verify_image_file(path)
    nibabel.save(nibabel.Nifti2Image(array, np.eye(4)), str(tmp_path / "nifti2.nii"))
    with pytest.raises(InputError, match="1 voxels are NaN"):
        verify_image_file(tmp_path / "nifti2.nii")


def test_a_good_file_of_every_format_passes(tmp_path):
    for index, (name, compressed, _data) in enumerate(FORMATS):
        path = write(phantom_image(), tmp_path / str(index), name, compressed)
        verify_image_file(path)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path)), sitk.GetArrayFromImage(phantom_image()))


# ------------------------------------------------------------------------------------------------ DICOM


def write_dicom_series(folder: Path, positions: list[float], series_uid: str = "1.2.826.0.1.3680043.2.1125.77") -> list[Path]:
    """A CT DICOM series of the phantom, one file per slice at the given z positions (mm)."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = chest_phantom(shape=(len(positions), 48, 48)).volume.astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for index, z in enumerate(positions):
        plane = sitk.GetImageFromArray(volume[index : index + 1])
        plane.SetSpacing((5.0, 5.0, 2.0))
        for tag, value in {
            "0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1", "0020|000e": series_uid,
            "0020|0013": str(index + 1), "0020|0032": f"0\\0\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0",
            "0008|0018": f"{series_uid}.{index + 1}", "0028|0030": "5\\5",
        }.items():
            plane.SetMetaData(tag, value)
        path = folder / f"IM{index:04d}"  # no suffix, like most scanner exports
        writer.SetFileName(str(path))
        writer.SetImageIO("GDCMImageIO")
        writer.Execute(plane)
        paths.append(path)
    return paths


def test_dicom_series_reads_whole(tmp_path):
    write_dicom_series(tmp_path / "series", [2.0 * k for k in range(12)])
    assert read_image(tmp_path / "series").GetSize() == (48, 48, 12)


@pytest.mark.parametrize("slice_index", [0, 5, 11], ids=["first", "middle", "last"])
@pytest.mark.parametrize("cut", [0.1, 0.6, 0.99])
def test_truncated_dicom_slice_is_an_error(tmp_path, slice_index, cut):
    paths = write_dicom_series(tmp_path / "series", [2.0 * k for k in range(12)])
    data = paths[slice_index].read_bytes()
    paths[slice_index].write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match=r"cannot be read|missing"):
        read_image(tmp_path / "series")


def test_deleted_dicom_slice_is_a_gap_error(tmp_path):
    paths = write_dicom_series(tmp_path / "series", [2.0 * k for k in range(12)])
    paths[6].unlink()
    with pytest.raises(InputError, match=r"gap of 4 mm .* 2 mm apart: about 1 slice missing"):
        read_image(tmp_path / "series")


def test_irregular_dicom_spacing_is_a_warning_and_itk_prints_nothing(tmp_path, capfd):
    positions = [2.0 * k for k in range(12)]
    positions[6:] = [z + 0.5 for z in positions[6:]]  # one step of 2.5 mm: irregular, not a missing slice
    write_dicom_series(tmp_path / "series", positions)
    warnings: list[str] = []
    image = read_image(tmp_path / "series", warnings)
    assert image.GetSize() == (48, 48, 12)
    captured = capfd.readouterr()
    assert "WARNING: In" not in captured.err and "SimpleITK-build" not in captured.err
    assert any("Non uniform sampling" in warning for warning in warnings), warnings


def test_single_dicom_file_asks_for_the_folder(tmp_path, tiny_model_manifest):
    paths = write_dicom_series(tmp_path / "one", [0.0])
    with pytest.raises(InputError, match=r"series has only 1 slice .* pass the folder that holds all its slices"):
        read_image(paths[0])
    with pytest.raises(InputError, match=r"only 1 axial slice \("):  # the folder: one slice is too few
        segment_file(tmp_path / "one", load_model_package(tiny_model_manifest))


def test_dicom_folder_with_two_series_says_so_once_even_with_quiet(tmp_path, tiny_model_manifest, capsys):
    write_dicom_series(tmp_path / "study", [2.0 * k for k in range(12)], series_uid="1.2.826.0.1.3680043.2.1125.11")
    write_dicom_series(tmp_path / "study2", [2.0 * k for k in range(9)], series_uid="1.2.826.0.1.3680043.2.1125.22")
    for path in (tmp_path / "study2").iterdir():
        shutil.move(str(path), tmp_path / "study" / f"B{path.name}")
    for quiet in ([], ["-q"]):
        code = main(["segment", str(tmp_path / "study"), "-o", str(tmp_path / "out"), "--model", str(tiny_model_manifest),
                     "--device", "cpu", "--no-preview", *quiet])
        assert code == 0
        assert capsys.readouterr().err.count("2 DICOM series found") == 1


def test_native_messages_are_cleaned():
    text = ("WARNING: In /tmp/SimpleITK-build/ITK-prefix/include/ITK-5.4/itkImageSeriesReader.hxx, line 502\n"
            "ImageSeriesReader (0x55c8ab2ce0b0): Non uniform sampling or missing slices detected,  maximum "
            "nonuniformity:1.88889\n\n")
    assert clean_native_messages(text) == ["Non uniform sampling or missing slices detected, maximum nonuniformity:1.88889"]


# ---------------------------------------------------------------------------------------- real scans


def test_real_scan_cut_to_60_percent_is_refused_with_exit_2(tmp_path, tiny_model_manifest, capsys):
    """The issue's reproduction: 60% of Lung_Dx-A0001_kernel-B.nii.gz used to give 4227 mL of lung, exit 0."""
    source = shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-B.nii.gz")
    cut = tmp_path / source.name
    data = source.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    code = main(["segment", str(cut), "-o", str(tmp_path / "out"), "--model", str(tiny_model_manifest), "-q"])
    assert code == EXIT_USAGE
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "out" / "Lung_Dx-A0001_kernel-B.seg.nrrd").exists()


@pytest.mark.parametrize("where", [0.3, 0.7])
def test_real_scan_with_a_flipped_byte_is_refused(tmp_path, where):
    source = shared_path("example-abdominal-ct", "example_ct.nii.gz")
    damaged = bytearray(source.read_bytes())
    damaged[int(len(damaged) * where)] ^= 0x01
    path = tmp_path / source.name
    path.write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="damaged|truncated"):
        read_image(path)


def test_real_dicom_series_with_a_truncated_slice_is_refused(tmp_path):
    source = shared_path("example-abdominal-ct", "dicom")
    folder = tmp_path / "dicom"
    shutil.copytree(source, folder)
    victim = sorted(folder.iterdir())[10]
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[:50_000])
    with pytest.raises(InputError, match=r"gap of 4 mm .*cannot be read"):
        read_image(folder)
