"""The whole job end to end with real TorchScript models: phantoms with known answers in any orientation,
real CT files (NIfTI, DICOM), the labelmap on the exact input grid, warnings, timings, progress, cancel."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import shared_path
from model_factory import write_model_package
from phantoms import chest_phantom, lung_and_infection_net
from test_imageio import assert_same_geometry

from CovidInfectionSegLib.model_package import ModelPackage, load_model_package
from CovidInfectionSegLib.pipeline import SegmentationCancelled, SegmentationResult, segment_file, segment_image
from CovidInfectionSegLib.validation import InputError


@pytest.fixture(scope="module")
def infection_model(tmp_path_factory) -> ModelPackage:
    return load_model_package(
        write_model_package(tmp_path_factory.mktemp("model"), lung_and_infection_net(), name="lunginf")
    )


@pytest.fixture(scope="module")
def tiny_model(tiny_model_manifest: Path) -> ModelPackage:
    return load_model_package(tiny_model_manifest)


def rotated_direction(degrees_z: float = 15.0, degrees_x: float = 8.0) -> tuple[float, ...]:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def reoriented(image: sitk.Image, direction: tuple[float, ...] | str) -> sitk.Image:
    """The same physical volume stored in another orientation (string: axis permutation/flip; tuple: a
    larger rotated grid around the same centre, resampled nearest-neighbour, soft tissue outside)."""
    if isinstance(direction, str):
        return sitk.DICOMOrient(image, direction)
    size = [int(s * 1.3) for s in image.GetSize()]
    rotated = sitk.Image(size, image.GetPixelID())
    rotated.SetSpacing(image.GetSpacing())
    rotated.SetDirection(direction)
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    offset = rotated.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in size])
    rotated.SetOrigin(tuple(o + c - f for o, c, f in zip(rotated.GetOrigin(), centre, offset)))
    return sitk.Resample(image, rotated, sitk.Transform(), sitk.sitkNearestNeighbor, 40.0)


def labels_at_phantom_points(result: SegmentationResult, phantom_image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Labelmap values at the physical points of the phantom voxels in ``mask`` (z, y, x)."""
    labelmap = sitk.GetArrayViewFromImage(result.labelmap)
    values = []
    for z, y, x in np.argwhere(mask)[::7]:
        point = phantom_image.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        index = result.labelmap.TransformPhysicalPointToIndex(point)
        values.append(labelmap[index[::-1]])
    return np.array(values)


def test_phantom_end_to_end_exact(infection_model: ModelPackage) -> None:
    phantom = chest_phantom(infection_in_right=True)
    image = phantom.image()
    seen: list[tuple[int, int]] = []
    result = segment_image(
        image, infection_model, device="cpu", batch_size=4, progress=lambda d, t: seen.append((d, t))
    )

    assert_same_geometry(result.labelmap, image)
    assert result.labelmap.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayViewFromImage(result.labelmap)
    np.testing.assert_array_equal(labels == 1, phantom.right_lung & ~phantom.infection)
    np.testing.assert_array_equal(labels == 2, phantom.left_lung)
    np.testing.assert_array_equal(labels == 3, phantom.infection)  # the bright spine is dropped: outside the lungs

    ml = phantom.voxel_ml
    measured = result.measurements
    assert measured.right_lung.lung_ml == pytest.approx(np.count_nonzero(phantom.right_lung) * ml)
    assert measured.right_lung.infection_ml == pytest.approx(np.count_nonzero(phantom.infection) * ml)
    assert measured.left_lung.infection_ml == 0.0
    assert measured.right_lung.grade == 2 and measured.total.grade == 1

    assert [segment.name for segment in result.segments] == ["Right lung", "Left lung", "Infection"]
    assert result.model_name == "lunginf" and result.model_version == "0.0.1" and result.device == "cpu"
    assert set(result.timings) == {"validate", "preprocess_infer", "postprocess", "total"}
    assert all(seconds >= 0 for seconds in result.timings.values())
    assert seen == [(4, 16), (8, 16), (12, 16), (16, 16)]
    assert any("in-plane spacing 5 x 5 mm" in warning for warning in result.warnings)


@pytest.mark.parametrize("orientation", ["RAS", "PIR", rotated_direction()], ids=["RAS", "PIR", "oblique"])
def test_phantom_in_other_orientations_lands_on_the_same_anatomy(infection_model: ModelPackage, orientation) -> None:
    phantom = chest_phantom(shape=(16, 64, 64), spacing=(5.0, 5.0, 8.0), infection_in_right=True)
    lps_image = phantom.image()
    image = reoriented(lps_image, orientation)
    result = segment_image(image, infection_model, device="cpu")
    assert_same_geometry(result.labelmap, image)
    # labels at the phantom's physical points: right lung is the patient's right whatever the storage order
    right = labels_at_phantom_points(result, lps_image, phantom.right_lung & ~phantom.infection)
    left = labels_at_phantom_points(result, lps_image, phantom.left_lung)
    infection = labels_at_phantom_points(result, lps_image, phantom.infection)
    exact = isinstance(orientation, str)  # the oblique grid is resampled, so its edges move a little
    assert np.mean(right == 1) > (0.999 if exact else 0.9)
    assert np.mean(left == 2) > (0.999 if exact else 0.9)
    assert np.mean(infection == 3) > (0.999 if exact else 0.8)


def test_cancel_after_first_batch(tiny_model: ModelPackage) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()

    with pytest.raises(SegmentationCancelled):
        segment_image(chest_phantom().image(), tiny_model, device="cpu", batch_size=4, progress=progress, cancel=cancel)
    assert seen == [4]


def test_bad_input_is_refused_before_inference(tiny_model: ModelPackage) -> None:
    thin = sitk.GetImageFromArray(chest_phantom().volume[:5].astype(np.int16))
    with pytest.raises(InputError, match="only 5 axial slices"):
        segment_image(thin, tiny_model, device="cpu", name="thin.nrrd")


def test_segment_file_reads_and_times(tmp_path: Path, infection_model: ModelPackage) -> None:
    phantom = chest_phantom(infection_in_right=True)
    path = tmp_path / "phantom.nrrd"
    sitk.WriteImage(reoriented(phantom.image(), "RAS"), str(path))
    result = segment_file(path, infection_model, device="cpu")
    assert result.source == str(path)
    assert list(result.timings) == ["read", "validate", "preprocess_infer", "postprocess", "total"]
    assert result.timings["total"] >= result.timings["read"] + result.timings["preprocess_infer"]
    assert all(warning.startswith(str(path)) for warning in result.warnings)
    assert result.measurements.total.infection_ml == pytest.approx(
        np.count_nonzero(phantom.infection) * phantom.voxel_ml
    )


def test_the_python_api_records_where_the_image_came_from(tmp_path: Path, tiny_model: ModelPackage) -> None:
    from CovidInfectionSegLib.imageio import read_image
    from CovidInfectionSegLib.pipeline import IN_MEMORY_SOURCE

    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(chest_phantom().image(), str(path))
    result = segment_image(read_image(path), tiny_model, device="cpu")  # as the README's Python example does
    assert result.source == str(path) and result.summary()["source"] == str(path)
    assert all(warning.startswith(str(path)) for warning in result.warnings)
    in_memory = segment_image(chest_phantom().image(), tiny_model, device="cpu")
    assert in_memory.source is None and in_memory.summary()["source"] == IN_MEMORY_SOURCE
    assert segment_file(path, tiny_model, device="cpu").input_image is not None


def test_segment_missing_file(tiny_model: ModelPackage, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        segment_file(tmp_path / "none.nii.gz", tiny_model)


@pytest.mark.parametrize(
    "parts", [("example-abdominal-ct", "dicom"), ("example-abdominal-ct", "example_ct.nii.gz")], ids=["dicom", "nifti"]
)
def test_real_abdominal_ct_end_to_end(tiny_model: ModelPackage, parts: tuple[str, str]) -> None:
    path = shared_path(*parts)
    result = segment_file(path, tiny_model, device="cpu")
    image = sitk.ReadImage(str(path)) if path.is_file() else None
    if image is not None:
        assert_same_geometry(result.labelmap, image)
    else:
        assert result.labelmap.GetSize() == (512, 512, 20)
        np.testing.assert_allclose(result.labelmap.GetSpacing(), (0.9765625, 0.9765625, 2.0))
    labels = sitk.GetArrayViewFromImage(result.labelmap)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    # no lungs in an abdomen: air outside the body and bowel gas must not become litres of lung
    assert result.measurements.total.lung_ml < 500
    assert any("mL of lung found" in warning for warning in result.warnings)


def test_real_chest_ct_end_to_end(tiny_model: ModelPackage) -> None:
    path = shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-B.nii.gz")
    result = segment_file(path, tiny_model, device="cpu", batch_size=16)
    image = sitk.ReadImage(str(path))
    assert_same_geometry(result.labelmap, image)
    measured = result.measurements
    # the tiny model calls every dark voxel lung; after post-processing both lungs are there, in litres
    assert 1000 < measured.right_lung.lung_ml < 5000 and 1000 < measured.left_lung.lung_ml < 5000
    labels = sitk.GetArrayViewFromImage(result.labelmap)
    centres = {}
    for value in (1, 2):
        z, y, x = np.argwhere(labels[::4, ::8, ::8] == value).mean(axis=0) * (4, 8, 8)
        centres[value] = image.TransformContinuousIndexToPhysicalPoint((x, y, z))
    assert centres[1][0] < centres[2][0]  # LPS: the right lung has the smaller physical x
