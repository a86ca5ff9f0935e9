"""Paths with characters outside ASCII: read and written here as they are, and under the rule of Windows
without the UTF-8 code page (CI has no Windows, so the rule is enforced here: SimpleITK "does not
find" a path that is not ASCII, and the 8.3 short names are ASCII links to the real folders)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib import itk_paths
from CovidInfectionSegLib.batch import _has_dicom_series
from CovidInfectionSegLib.imageio import read_image
from CovidInfectionSegLib.checksums import sha256_of
from CovidInfectionSegLib.outputs import write_labelmap
from CovidInfectionSegLib.sample_data import load_default_input
from CovidInfectionSegLib.validation import InputError
from test_imageio import write_dicom_series

FOLDER = "Patiënt José 张"  # as in C:\Users\José\AppData\Local\Temp


def small_ct() -> sitk.Image:
    image = sitk.GetImageFromArray(np.arange(8 * 16 * 16, dtype=np.int16).reshape(8, 16, 16) - 1000)
    image.SetSpacing((0.8, 0.8, 2.5))
    return image


@pytest.fixture
def windows_without_utf8(tmp_path, monkeypatch):
    """SimpleITK refuses non-ASCII paths, as on Windows without the UTF-8 code page; ``_short_path``
    answers with an ASCII link to the folder, like an 8.3 name. Returns a dict: set ``short_names``
    to False for a volume where Windows makes none."""
    state = {"short_names": True}
    aliases = tmp_path / "8.3"
    aliases.mkdir()

    def short_path(path: str) -> str | None:
        if not state["short_names"] or not os.path.exists(path):
            return None
        if path.isascii():
            return path
        alias = aliases / f"SHORT~{len(list(aliases.iterdir())) + 1}"
        alias.symlink_to(path)
        return str(alias)

    def ascii_only(function):
        def refusing(*args, **kwargs):
            for argument in args:
                if isinstance(argument, str) and not argument.isascii():
                    raise RuntimeError(f"Exception thrown in SimpleITK: The file \"{argument}\" does not exist.")
            return function(*args, **kwargs)
        return refusing

    monkeypatch.setattr(itk_paths, "_narrow_paths_lose_characters", lambda: True)
    monkeypatch.setattr(itk_paths, "_short_path", short_path)
    monkeypatch.setattr(sitk, "WriteImage", ascii_only(sitk.WriteImage))
    monkeypatch.setattr(sitk, "ReadImage", ascii_only(sitk.ReadImage))
    monkeypatch.setattr(sitk.ImageFileReader, "SetFileName", ascii_only(sitk.ImageFileReader.SetFileName))
    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesIDs",
                        staticmethod(ascii_only(sitk.ImageSeriesReader.GetGDCMSeriesIDs)))
    list_series = ascii_only(sitk.ImageSeriesReader.GetGDCMSeriesFileNames)

    def list_series_without_unopenable_files(*args, **kwargs):
        """GDCM finds a file named outside ASCII but cannot open it, so it leaves it out of the series."""
        return tuple(name for name in list_series(*args, **kwargs) if os.path.basename(name).isascii())

    monkeypatch.setattr(sitk.ImageSeriesReader, "GetGDCMSeriesFileNames", staticmethod(list_series_without_unopenable_files))
    return state


def test_here_a_non_ascii_folder_is_read_and_written_as_it_is(tmp_path):
    folder = tmp_path / FOLDER
    folder.mkdir()
    sitk.WriteImage(small_ct(), str(folder / "scan.nrrd"))
    assert itk_paths.itk_path(folder / "scan.nrrd") == str(folder / "scan.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(folder / "scan.nrrd")),
                                  sitk.GetArrayFromImage(small_ct()))
    write_labelmap(sitk.Cast(small_ct() > 0, sitk.sitkUInt8), folder / "labels.nii.gz")
    assert sitk.ReadImage(str(folder / "labels.nii.gz")).GetSize() == (16, 16, 8)


def test_the_rule_is_enforced(tmp_path, windows_without_utf8):
    (tmp_path / FOLDER).mkdir()
    with pytest.raises(RuntimeError, match="does not exist"):
        sitk.WriteImage(small_ct(), str(tmp_path / FOLDER / "scan.nrrd"))


def test_under_the_rule_files_and_dicom_folders_go_by_their_folders_short_name(tmp_path, windows_without_utf8):
    folder = tmp_path / FOLDER
    folder.mkdir()
    ascii_copy = tmp_path / "scan.nrrd"
    sitk.WriteImage(small_ct(), str(ascii_copy))
    (folder / "scan.nrrd").write_bytes(ascii_copy.read_bytes())
    short = itk_paths.itk_path(folder / "scan.nrrd")
    assert short.isascii() and short.endswith(os.sep + "scan.nrrd")  # the file keeps its name: the format
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(folder / "scan.nrrd")),
                                  sitk.GetArrayFromImage(small_ct()))

    write_labelmap(sitk.Cast(small_ct() > 0, sitk.sitkUInt8), folder / "labels.nii.gz")
    assert sorted(path.name for path in folder.iterdir()) == ["labels.nii.gz", "scan.nrrd"]

    write_dicom_series(tmp_path / "dicom" / FOLDER, "1.2.826.0.1.3680043.2.1125.101", slices=6, value=100)
    assert read_image(tmp_path / "dicom" / FOLDER).GetSize() == (16, 16, 6)
    assert _has_dicom_series(tmp_path / "dicom" / FOLDER, os.listdir(tmp_path / "dicom" / FOLDER))


def test_without_a_short_name_the_error_says_what_to_do_and_nothing_is_written(tmp_path, windows_without_utf8):
    folder = tmp_path / FOLDER
    folder.mkdir()
    sitk.WriteImage(small_ct(), str(tmp_path / "scan.nrrd"))
    (folder / "scan.nrrd").write_bytes((tmp_path / "scan.nrrd").read_bytes())
    windows_without_utf8["short_names"] = False
    with pytest.raises(InputError, match=r"scan.nrrd: SimpleITK cannot open .* no short \(8.3\) name .* set the TEMP"):
        read_image(folder / "scan.nrrd")
    with pytest.raises(OSError, match="Use Unicode UTF-8 for worldwide language support"):
        write_labelmap(sitk.Cast(small_ct() > 0, sitk.sitkUInt8), folder / "labels.nii.gz")
    assert [path.name for path in folder.iterdir()] == ["scan.nrrd"]


def test_a_file_name_outside_ascii_asks_for_an_ascii_name(tmp_path, windows_without_utf8):
    sitk.WriteImage(small_ct(), str(tmp_path / "scan.nrrd"))
    (tmp_path / "scan.nrrd").rename(tmp_path / "Lunge_Müller.nrrd")
    with pytest.raises(InputError, match="whose name has characters outside ASCII.*plain ASCII name"):
        read_image(tmp_path / "Lunge_Müller.nrrd")


def test_under_the_rule_an_output_named_after_a_non_ascii_scan_is_written_through_an_ascii_stand_in(
        tmp_path, windows_without_utf8):
    """Outputs are named after the scan (``Müller.labels.nii.gz``): the file itself, not only its folder."""
    folder = tmp_path / FOLDER
    folder.mkdir()
    labels = sitk.Cast(small_ct() > 0, sitk.sitkUInt8)
    write_labelmap(labels, folder / "Müller.labels.nii.gz")
    assert [path.name for path in folder.iterdir()] == ["Müller.labels.nii.gz"]  # no stand-in left
    ascii_copy = tmp_path / "check.nii.gz"
    ascii_copy.write_bytes((folder / "Müller.labels.nii.gz").read_bytes())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(ascii_copy))), sitk.GetArrayFromImage(labels))


def test_a_dicom_folder_simpleitk_cannot_open_stays_in_a_batch_and_says_why(tmp_path, windows_without_utf8):
    folder = tmp_path / FOLDER
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", slices=6, value=100)
    windows_without_utf8["short_names"] = False
    assert _has_dicom_series(folder, os.listdir(folder)), "left out of the batch without a word"
    with pytest.raises(InputError, match="no short \\(8.3\\) name"):
        read_image(folder)


def test_a_dicom_slice_named_outside_ascii_is_refused_with_that_reason_not_as_damaged(tmp_path, windows_without_utf8):
    folder = tmp_path / "dicom"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", slices=6, value=100)
    (folder / "101_003.dcm").rename(folder / "Schnitt_ä_003.dcm")
    with pytest.raises(InputError, match=r"1 file \(Schnitt_ä_003.dcm\) of DICOM series .* cannot be read \(1 file "
                       r"\(Schnitt_ä_003.dcm\) named with characters outside ASCII, which SimpleITK cannot open on this "
                       r"Windows: give them plain ASCII names, or turn on 'Beta: Use Unicode UTF-8") as raised:
        read_image(folder)
    assert "damaged" not in str(raised.value)


def test_another_series_named_outside_ascii_is_left_out_with_that_reason(tmp_path, windows_without_utf8):
    folder = tmp_path / "dicom"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", slices=6, value=100)
    write_dicom_series(tmp_path / "other", "1.2.826.0.1.3680043.2.1125.202", slices=2, value=500)
    (tmp_path / "other" / "202_000.dcm").rename(folder / "Übersicht.dcm")
    warnings: list[str] = []
    assert read_image(folder, warnings).GetSize() == (16, 16, 6)
    assert any("1 file (Übersicht.dcm) look like DICOM but cannot be read (1 file (Übersicht.dcm) named with "
               "characters outside ASCII" in warning and warning.endswith("; ignored") for warning in warnings), warnings


def test_here_dicom_slices_named_outside_ascii_are_read(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", slices=6, value=100)
    (folder / "101_003.dcm").rename(folder / "Schnitt_ä_003.dcm")
    warnings: list[str] = []
    assert read_image(folder, warnings).GetSize() == (16, 16, 6) and warnings == []


def test_a_cached_sample_simpleitk_cannot_open_falls_back_to_the_phantom_and_says_so(tmp_path, windows_without_utf8):
    import io

    cache = tmp_path / FOLDER  # the user's profile
    cache.mkdir()
    sitk.WriteImage(small_ct(), str(tmp_path / "sample.nrrd"))
    (cache / "sample.nrrd").write_bytes((tmp_path / "sample.nrrd").read_bytes())
    windows_without_utf8["short_names"] = False
    messages = io.StringIO()
    default = load_default_input("http://127.0.0.1:9/unused", sha256_of(cache / "sample.nrrd"), "sample.nrrd", cache,
                                 messages=messages)
    assert default.is_synthetic and default.path is None
    assert "could not read the downloaded sample" in messages.getvalue() and "not a real result" in messages.getvalue()
