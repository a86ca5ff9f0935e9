"""The bundled model v1 on real scans it never saw (the acceptance checks of the model card):
a healthy-lung chest CT reconstructed with two kernels, and abdominal CTs without lungs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib.model_package import default_model_path, load_model_package
from CovidInfectionSegLib.pipeline import segment_file
from shared_data import shared_path


@pytest.fixture(scope="module")
def bundled_model():
    path = default_model_path()
    assert path.exists(), f"the bundled model must be committed: {path}"
    return load_model_package(path)


def test_bundled_manifest_describes_the_model(bundled_model) -> None:
    manifest = bundled_model.manifest
    assert manifest["licence"] == "CC BY-NC-SA 4.0"
    assert manifest["recipe"]["hu_window"] == [-1024, 3071]
    assert [segment.name for segment in bundled_model.segments] == ["Right lung", "Left lung", "Infection"]
    assert manifest["metrics"]["per_case"]["lung"]["dice"]["mean"] > 0.95


def test_bundled_model_was_trained_on_every_case_and_says_its_metrics_are_a_recipe_estimate(bundled_model) -> None:
    manifest = bundled_model.manifest
    training = manifest["training_data"]
    assert training["trained_folds"] == "all" and training["validation_fold"] is None
    assert len(training["training_cases"]) == 20 and training["n_training_slices"] == 1614
    assert "trained on every case" in manifest["metrics"]["estimate_of_recipe"]


@pytest.fixture(scope="module")
def chest_results(bundled_model):
    folder = shared_path("example-chest-ct")
    return {
        kernel: segment_file(folder / f"Lung_Dx-A0001_kernel-{kernel}.nii.gz", bundled_model, device="cpu")
        for kernel in ("L", "B")
    }


@pytest.mark.parametrize("kernel", ["L", "B"])
def test_real_chest_ct_has_two_lungs_of_human_size_on_the_right_sides(chest_results, kernel) -> None:
    result = chest_results[kernel]
    m = result.measurements
    assert 1000 < m.right_lung.lung_ml < 5000 and 1000 < m.left_lung.lung_ml < 5000
    assert 3000 < m.total.lung_ml < 8000
    labels = sitk.GetArrayFromImage(result.labelmap)
    # the image is RAS-stored NIfTI read by SimpleITK in LPS: physical x grows toward the patient's left
    image = result.labelmap
    centroid_x = {}
    for value in (1, 2):
        z, y, x = np.nonzero(labels[::4, ::4, ::4] == value)
        index = [int(np.mean(x)) * 4, int(np.mean(y)) * 4, int(np.mean(z)) * 4]
        centroid_x[value] = image.TransformIndexToPhysicalPoint(index)[0]
    assert centroid_x[1] < centroid_x[2], "right lung must lie on the patient's right (smaller LPS x)"


def test_real_chest_ct_without_covid_has_little_infection_and_kernel_agreement(chest_results) -> None:
    sharp, soft = chest_results["L"].measurements.total, chest_results["B"].measurements.total
    assert sharp.infection_ml < 100 and soft.infection_ml < 100
    assert abs(sharp.lung_ml - soft.lung_ml) / soft.lung_ml < 0.03


def test_real_abdominal_dicom_has_no_lung_and_no_infection(bundled_model) -> None:
    result = segment_file(shared_path("example-abdominal-ct", "dicom"), bundled_model, device="cpu")
    assert result.measurements.total.lung_ml < 50
    assert result.measurements.total.infection_ml < 1


def test_real_abdominal_nifti_with_lung_bases_has_little_lung_and_infection(bundled_model) -> None:
    result = segment_file(shared_path("example-abdominal-ct", "example_ct.nii.gz"), bundled_model, device="cpu")
    assert result.measurements.total.lung_ml < 500
    assert result.measurements.total.infection_ml < 20
    assert any("lung" in warning for warning in result.warnings)
