"""prepare: Zenodo-style NIfTI volumes and the PNG export -> SliceDataset .npz."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import nibabel
import numpy as np
import pytest

from CovidInfectionSegLib.preprocessing import IntensityRecipe, preprocess_slices
from covidseg_training.__main__ import main as cli
from covidseg_training.data import DEFAULT_PNG_ROOT, INFECTION, LUNG, SliceDataset
from covidseg_training.prepare import (case_key, middle_range, prepare_zenodo, read_volume, read_volume_and_spacing,
                                       stored_pixel_mm, stored_windowed)
from synthetic_zenodo import SHAPE, SLICE_WITHOUT_INFECTION, make_case


@pytest.fixture(scope="module")
def unpacked(record_archives, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zenodo")
    for name, path in record_archives.items():
        with zipfile.ZipFile(path) as bundle:
            bundle.extractall(root / Path(name).stem)
    return root


@pytest.mark.parametrize("name, key", [
    ("coronacases_org_001.nii", "coronacases_001"),
    ("coronacases_001.nii.gz", "coronacases_001"),
    ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii.gz", "radiopaedia_4_85506_1"),
    ("radiopaedia_4_85506_1.nii.gz", "radiopaedia_4_85506_1"),
    ("other.nii.gz", "other"),
])
def test_case_key_matches_images_to_masks(name, key):
    assert case_key(Path(name)) == key


def test_middle_range_is_the_export_rule():
    assert middle_range(12, 0.6) == range(2, 10)  # round(0.2 n) .. round(0.8 n)
    assert middle_range(301, 0.6) == range(60, 241)
    assert middle_range(12, 1.0) == range(0, 12)
    with pytest.raises(ValueError):
        middle_range(12, 0.0)


def test_orientations(tmp_path):
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    path = tmp_path / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, np.diag([-0.7, -0.7, 5.0, 1.0])), str(path))  # voxel axes already LPS
    engine, export = read_volume(path, "engine"), read_volume(path, "png-export")
    assert engine.shape == export.shape == (SHAPE[2], SHAPE[1], SHAPE[0])
    np.testing.assert_array_equal(engine[3], data[:, :, 3].T)  # rows y (anterior first), columns x
    np.testing.assert_array_equal(export[3], np.rot90(data[:, :, 3]))
    with pytest.raises(ValueError, match="unknown orientation"):
        read_volume(path, "sideways")


def test_spacing_in_both_orientations(tmp_path):
    path = tmp_path / "v.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([-0.6, -0.8, 5.0, 1.0])), str(path))
    assert read_volume_and_spacing(path, "engine")[1] == pytest.approx((0.8, 0.6))  # (rows ~ y, columns ~ x)
    assert read_volume_and_spacing(path, "png-export")[1] == pytest.approx((0.8, 0.6))


def test_stored_pixel_size_follows_padding_and_resizing():
    assert stored_pixel_mm((512, 512), (0.7, 0.7), 256) == pytest.approx(1.4)
    assert stored_pixel_mm((400, 512), (0.7, 0.7), 256) == pytest.approx(1.4)  # padded to 512 first
    assert stored_pixel_mm((64, 64), (0.5, 2.0), 64) == pytest.approx(1.0)  # geometric mean


def test_windowed_volumes_are_detected():
    volume, _, _ = make_case(0)
    assert not stored_windowed(volume)
    assert stored_windowed(np.clip(volume + 1250, 0, 255))


def test_prepare_zenodo(unpacked):
    messages = []
    dataset, facts = prepare_zenodo(unpacked, input_size=64, log=messages.append)
    assert sorted(facts["cases"]) == ["coronacases_001", "coronacases_002", "radiopaedia_4_85506_1",
                                      "radiopaedia_7_85703_0"]
    for key, case in facts["cases"].items():
        assert case["slices_in_middle"] == 8
        assert case["slices_kept"] == 7, "the slice without infection must be dropped"
        windowed = key.startswith("radiopaedia")
        assert case["stored_as"].startswith("windowed" if windowed else "HU")
    assert len(messages) == 4 and "windowed" in messages[2]
    assert dataset.images.shape == (28, 64, 64) and dataset.images.dtype == np.uint8
    assert all(case["pixel_mm"] == pytest.approx(1.5) for case in facts["cases"].values())
    np.testing.assert_allclose(dataset.pixel_mm, 1.5)
    np.testing.assert_allclose(prepare_zenodo(unpacked, input_size=32, log=lambda _: None)[0].pixel_mm, 3.0)
    assert set(np.unique(dataset.labels)) == {0, LUNG, INFECTION}
    assert all((dataset.labels[i] == INFECTION).any() for i in range(len(dataset.labels)))
    # the HU case went through the engine's recipe (HU window clips the -2048 padding)
    volume = read_volume(unpacked / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz")
    kept = [z for z in middle_range(len(volume), 0.6) if z != SLICE_WITHOUT_INFECTION]
    expected = preprocess_slices(volume[kept], IntensityRecipe(input_size=64))
    np.testing.assert_array_equal(dataset.images[dataset.cases == "coronacases_001"], expected)


def test_prepare_cli_writes_npz_and_facts(unpacked, tmp_path):
    out = tmp_path / "zenodo.npz"
    assert cli(["prepare", "--zenodo", str(unpacked), "--out", str(out), "--input-size", "64", "--all-slices"]) == 0
    dataset = SliceDataset.load(out)
    assert len(dataset.images) == 32  # 8 middle slices x 4 cases, none dropped
    assert dataset.pixel_mm is not None and dataset.pixel_mm.shape == (32,)  # saved and read back
    facts = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert facts["slices"] == 32 and facts["orientation"] == "engine"


def test_missing_masks_are_named(unpacked, tmp_path):
    root = tmp_path / "broken"
    (root / "COVID-19-CT-Seg_20cases").mkdir(parents=True)
    source = unpacked / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz"
    (root / "COVID-19-CT-Seg_20cases" / source.name).write_bytes(source.read_bytes())
    with pytest.raises(FileNotFoundError, match="coronacases_001.nii.gz: no masks for case 'coronacases_001'"):
        prepare_zenodo(root, input_size=64)
    with pytest.raises(FileNotFoundError, match="no .nii"):
        prepare_zenodo(tmp_path / "empty", input_size=64)


def test_prepare_png_export(tmp_path):
    root = DEFAULT_PNG_ROOT
    if not (root / "cases.csv").exists():
        pytest.skip(f"real data not available: {root} (only on the project's build machines)")
    out = tmp_path / "ma2020.npz"
    assert cli(["prepare", "--png", str(root), "--out", str(out)]) == 0
    dataset = SliceDataset.load(out)
    assert dataset.images.shape[1:] == (256, 256) and len(dataset.images) == len(dataset.cases)
    assert len(set(dataset.cases.tolist())) == 20
