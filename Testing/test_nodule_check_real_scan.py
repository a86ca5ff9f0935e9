"""What the post-processing's nodule check (step 6: small solid infection components become lung) costs
on a real COVID-19 scan: the bundled model's network output for covid-chest-ct, post-processed with and
without the check. The model card's rule for having it on by default: at least 95% of the infection kept,
and the lungs unchanged."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.inference import predict_volume
from CovidInfectionSegLib.model_package import default_model_path, load_model_package
from CovidInfectionSegLib.postprocessing import INFECTION, WITHOUT_NODULE_CHECK, postprocess
from shared_data import shared_path


def test_the_nodule_check_keeps_a_real_covid_scans_infection_and_lungs() -> None:
    canonical = to_canonical(read_image(shared_path("covid-chest-ct", "MIDRC-RICORD-1A-419639-001012.nii.gz")))
    volume = sitk.GetArrayViewFromImage(canonical)
    classes = predict_volume(volume, load_model_package(default_model_path()), "cpu", precision="fp32")
    with_check = postprocess(classes, volume, canonical.GetSpacing())
    without = postprocess(classes, volume, canonical.GetSpacing(), settings=WITHOUT_NODULE_CHECK)
    voxel_ml = float(np.prod(canonical.GetSpacing())) / 1000.0
    infection_with = np.count_nonzero(with_check.labels == INFECTION) * voxel_ml
    infection_without = np.count_nonzero(without.labels == INFECTION) * voxel_ml
    assert infection_without > 200, f"the scan's infection is found ({infection_without:.1f} mL)"
    assert infection_without >= infection_with >= 0.95 * infection_without, (infection_with, infection_without)
    np.testing.assert_array_equal(with_check.side, without.side)  # what it takes out stays lung, on its side
    changed = with_check.labels != without.labels
    assert np.all(without.labels[changed] == INFECTION) and np.all(with_check.labels[changed] == without.side[changed])
