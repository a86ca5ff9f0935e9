"""Output files read back by independent readers: slicerio / SimpleITK (.seg.nrrd), SimpleITK (.nii.gz), OpenCV (PNG)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.outputs import (
    OutputError,
    ensure_output_dir,
    ijk_to_lps,
    output_paths,
    outputs_complete,
    write_all,
    write_labelmap,
    write_segmentation_nrrd,
)
from CovidInfectionSegLib.imageio import to_canonical
from CovidInfectionSegLib.preview import Outline, choose_preview_slices, render_preview, write_preview_png
from CovidInfectionSegLib.pipeline import segment_image
from CovidInfectionSegLib.sample_data import synthetic_chest

# A permuted, flipped direction and odd spacing/origin, so geometry mistakes show.
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="module")
def model(tiny_model_manifest):
    return load_model_package(tiny_model_manifest)


@pytest.fixture(scope="module")
def ct_and_labels():
    """A small synthetic chest and a labelmap made from it by thresholds: 1/2 lungs by side, 3 ground glass."""
    ct = synthetic_chest(size=(64, 56, 12), spacing=(4.0, 4.5, 10.0))
    ct.SetDirection(DIRECTION)
    ct.SetOrigin((12.5, -30.25, 101.0))
    hu = sitk.GetArrayFromImage(ct)
    labels = np.zeros(hu.shape, np.uint8)
    columns = np.arange(hu.shape[2])[None, None, :]
    rows = np.arange(hu.shape[1])[None, :, None]
    inside = ((columns - 31.5) / 29) ** 2 + ((rows - 27.5) / 17) ** 2 < 0.8
    lung = (hu < -700) & inside
    labels[lung & (columns < 32)] = 1
    labels[lung & (columns >= 32)] = 2
    labels[(hu > -650) & (hu < -350) & inside] = 3
    labels[6, 20:24, 10:14] = 3  # make sure every value is present
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(ct)
    return ct, labelmap


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_seg_nrrd_reads_back_in_slicerio_with_names_colours_terminology_and_geometry(tmp_path, ct_and_labels, model):
    _ct, labelmap = ct_and_labels
    path = write_segmentation_nrrd(labelmap, model.segments, tmp_path / "case.seg.nrrd")

    segmentation = slicerio.read_segmentation(str(path))
    by_value = {segment["labelValue"]: segment for segment in segmentation["segments"]}
    assert sorted(by_value) == [1, 2, 3]
    for info in model.segments:
        segment = by_value[info.value]
        assert segment["name"] == info.name
        np.testing.assert_allclose(segment["color"], np.array(info.color) / 255.0, atol=1e-5)
        assert segment["terminology"]["category"] == info.terminology["category"]
        assert segment["terminology"]["type"] == info.terminology["type"]
    assert by_value[3]["terminology"]["anatomicRegion"] == ["SCT", "39607008", "Lung"]
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(labelmap), atol=1e-6)
    voxels = segmentation["voxels"]  # (i, j, k)
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), sitk.GetArrayFromImage(labelmap))

    as_image = sitk.ReadImage(str(path))  # what any NRRD reader sees: the CT's grid
    assert_same_geometry(as_image, labelmap)


def test_labelmap_nifti_keeps_values_and_geometry(tmp_path, ct_and_labels):
    _ct, labelmap = ct_and_labels
    path = write_labelmap(labelmap, tmp_path / "case.labels.nii.gz")
    back = sitk.ReadImage(str(path))
    assert back.GetPixelID() == sitk.sitkUInt8
    assert_same_geometry(back, labelmap)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(labelmap))


def test_preview_png_decodes_with_montage_size_and_segment_overlays(tmp_path, ct_and_labels, model):
    ct, labelmap = ct_and_labels
    measurements = segment_image(ct, model, device="cpu").measurements
    path = write_preview_png(ct, labelmap, model.segments, measurements, tmp_path / "p.png", "title")
    image = cv2.imread(str(path))
    assert image is not None and image.ndim == 3
    height, width = image.shape[:2]
    assert 640 <= width <= 4 * 320 and 300 <= height <= 2000

    empty = sitk.Image(labelmap.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(labelmap)
    write_preview_png(ct, empty, model.segments, measurements, tmp_path / "empty.png", "title")
    without_labels = cv2.imread(str(tmp_path / "empty.png"))
    # Outlines are drawn in each segment's exact colour: present with labels, absent without
    # (both images have the same legend swatches).
    for info in model.segments:
        bgr = np.array(info.color[::-1], np.uint8)
        with_count = np.all(image == bgr, axis=2).sum()
        without_count = np.all(without_labels == bgr, axis=2).sum()
        assert with_count >= without_count + 20, info.name


def test_preview_outlines_are_drawn_and_slices_can_be_chosen(ct_and_labels, model):
    """Outline-only masks (what the training's whole-scan checks add) appear in their colour and in the
    legend; explicit slices replace the automatic choice."""
    ct, labelmap = ct_and_labels
    shape = sitk.GetArrayFromImage(to_canonical(labelmap)).shape
    mask = np.zeros(shape, dtype=bool)
    mask[2:5, 10:30, 10:30] = True
    color = (1, 250, 3)
    bgr = np.array(color[::-1], np.uint8)
    plain = render_preview(ct, labelmap, model.segments, slice_indices=[3, 2])
    outlined = render_preview(ct, labelmap, model.segments, outlines=[Outline("reference", color, mask)],
                              slice_indices=[3, 2])
    assert plain.shape == outlined.shape
    assert not np.all(plain == bgr, axis=2).any()
    assert np.all(outlined == bgr, axis=2).sum() > 2 * 40  # two tiles' outlines and the legend swatch
    wrong = Outline("wrong size", color, mask[:-1])
    with pytest.raises(ValueError, match="wrong size"):
        render_preview(ct, labelmap, model.segments, outlines=[wrong])


def test_preview_slices_span_the_labelled_range_superior_first():
    labels = np.zeros((40, 8, 8), np.uint8)
    labels[10:31, 2:5, 2:5] = 1
    chosen = choose_preview_slices(labels, count=12)
    assert len(chosen) == 12 and chosen == sorted(chosen, reverse=True)
    assert chosen[0] == 30 and chosen[-1] == 10
    assert choose_preview_slices(np.zeros((5, 4, 4), np.uint8)) == [4, 3, 2, 1, 0]  # nothing labelled: all


def test_write_all_writes_every_file_and_records_the_input(tmp_path, ct_and_labels, model):
    ct, _labels = ct_and_labels
    result = segment_image(ct, model, device="cpu")
    result.source = "phantom for test"
    outdir = tmp_path / "new" / "folder"
    paths = write_all(result, ct, outdir, "case")
    assert set(paths) == {"segmentation", "labelmap", "measurements_csv", "measurements_json", "preview"}
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())
    assert outputs_complete(outdir, "case")
    record = json.loads(paths["measurements_json"].read_text(encoding="utf-8"))
    assert record["source"] == "phantom for test"
    assert record["measurements"]["total"]["lung_ml"] == pytest.approx(result.measurements.total.lung_ml, abs=1e-3)
    assert paths["measurements_csv"].read_text(encoding="utf-8").splitlines()[0].startswith("region,lung_ml")
    visible = sorted(p.name for p in outdir.iterdir() if not p.name.startswith("."))
    assert visible == sorted(p.name for p in paths.values())

    no_preview = write_all(result, ct, tmp_path / "np", "case", preview=False)
    assert "preview" not in no_preview and not (tmp_path / "np" / "case.preview.png").exists()
    write_all(result, ct, outdir, "case", preview=False)  # a run without preview removes the earlier one
    assert not (outdir / "case.preview.png").exists() and outputs_complete(outdir, "case", preview=False)


def test_failed_write_leaves_no_partial_file(tmp_path, ct_and_labels, model):
    _ct, labelmap = ct_and_labels
    blocker = tmp_path / "case.seg.nrrd"
    blocker.mkdir()  # the final rename onto a folder fails after the data was written
    with pytest.raises(OSError):
        write_segmentation_nrrd(labelmap, model.segments, blocker)
    assert [p.name for p in tmp_path.iterdir()] == ["case.seg.nrrd"]


def test_failure_in_write_all_writes_nothing_and_keeps_the_previous_result(tmp_path, ct_and_labels, model):
    ct, _labels = ct_and_labels
    result = segment_image(ct, model, device="cpu")
    result.source = "first run"
    write_all(result, ct, tmp_path, "case")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".")}
    result.source = "second run"
    other_ct = synthetic_chest(size=(32, 32, 12), spacing=(8.0, 8.0, 10.0))  # wrong grid: the preview, written last, fails
    with pytest.raises(ValueError, match="differ in size"):
        write_all(result, other_ct, tmp_path, "case")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith(".")}
    assert after == before  # the first run's five files, byte for byte
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".covidseg-commit.lock"]  # no staging left
    assert json.loads((tmp_path / "case.measurements.json").read_text(encoding="utf-8"))["source"] == "first run"


def test_unwritable_output_folder_is_a_clear_error(tmp_path, ct_and_labels, model):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="taken is an existing file"):
        ensure_output_dir(a_file)
    with pytest.raises(OutputError, match=r"taken is a file, not a folder"):
        ensure_output_dir(a_file / "sub" / "out")
    ct, _labels = ct_and_labels
    result = segment_image(ct, model, device="cpu")
    with pytest.raises(OutputError):
        write_all(result, ct, a_file / "out", "case")
    assert a_file.read_text(encoding="utf-8") == "x"


def test_output_paths_names():
    paths = output_paths("/x", "scan", preview=False)
    assert {p.name for p in paths.values()} == {
        "scan.seg.nrrd", "scan.labels.nii.gz", "scan.measurements.csv", "scan.measurements.json"
    }


def test_seg_nrrd_of_a_wider_integer_labelmap_holds_the_same_uint8_voxels(tmp_path, ct_and_labels, model):
    _ct, labelmap = ct_and_labels
    wide = sitk.Cast(labelmap, sitk.sitkInt16)
    path = write_segmentation_nrrd(wide, model.segments, tmp_path / "wide.seg.nrrd")
    voxels = slicerio.read_segmentation(str(path))["voxels"]
    assert voxels.dtype == np.uint8
    np.testing.assert_array_equal(voxels.transpose(2, 1, 0), sitk.GetArrayFromImage(labelmap))
