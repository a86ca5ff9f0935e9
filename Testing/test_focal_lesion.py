"""The largest infection lesion and the focal-lesion warning: hand-made masks, then the bundled model on
the real scans (a tumour on the healthy chest CT; patchy infection on the COVID-19 CT)."""

from __future__ import annotations

import numpy as np
import pytest

from CovidInfectionSegLib.focal_lesion import Lesion, focal_lesion_warning, largest_lesion
from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.pipeline import segment_file
from shared_data import shared_path

SPACING_ZYX = (5.0, 1.0, 1.0)  # 5 uL voxels


def lungs_with_lesions() -> tuple[np.ndarray, np.ndarray]:
    """Right lung (x < 50) and left lung; a 4 x 20 x 20 voxel lesion (8 mL, 20 mm across in-plane and in
    z) in the left lung and a 2 x 10 x 10 one (1 mL) in the right."""
    side = np.zeros((20, 60, 100), dtype=np.uint8)
    side[:, 5:55, 5:50] = 1
    side[:, 5:55, 50:95] = 2
    infection = np.zeros(side.shape, dtype=bool)
    infection[8:12, 20:40, 60:80] = True
    infection[2:4, 10:20, 10:20] = True
    return infection, side


def test_largest_lesion_volume_share_extent_and_side():
    infection, side = lungs_with_lesions()
    lesion = largest_lesion(infection, side, SPACING_ZYX)
    assert lesion.ml == pytest.approx(8.0) and lesion.share == pytest.approx(8 / 9)
    assert lesion.extent_mm == pytest.approx(20.0) and lesion.side == "left"
    assert largest_lesion(np.zeros_like(infection), side, SPACING_ZYX) is None


def test_lesions_touching_at_a_corner_are_one():
    infection, side = lungs_with_lesions()
    infection[12, 40, 80] = True  # diagonal neighbour of the large lesion's corner
    infection[13, 41, 81:90] = True
    lesion = largest_lesion(infection, side, SPACING_ZYX)
    assert lesion.ml == pytest.approx(8.0 + 10 * 0.005) and lesion.extent_mm == pytest.approx(30.0)


@pytest.mark.parametrize("lesion, total, warned", [
    (Lesion(ml=46.0, share=0.92, extent_mm=67.0, side="left"), 49.8, True),  # the tumour on example-chest-ct
    (Lesion(ml=242.4, share=0.74, extent_mm=162.0, side="right"), 326.0, False),  # covid-chest-ct: too wide
    (Lesion(ml=20.0, share=0.45, extent_mm=40.0, side="left"), 44.4, False),  # under half of the infection
    (Lesion(ml=4.0, share=1.0, extent_mm=20.0, side="right"), 4.0, False),  # too small to matter
    (None, 0.0, False),
])
def test_warning_for_one_focal_lesion_holding_most_of_the_infection(lesion, total, warned):
    text = focal_lesion_warning(lesion, total, "scan.nii.gz")
    assert (text is not None) == warned
    if warned:
        assert text.startswith("scan.nii.gz: 46 of the 50 mL of infection is one focal lesion in the left lung, "
                               "7 cm across at most") and "check this lesion by eye" in text


@pytest.fixture(scope="module")
def bundled_model():
    return load_model_package()


def test_real_tumour_is_flagged_and_real_covid_19_is_not(bundled_model):
    """example-chest-ct (no COVID-19), kernel L: 2.2.0 still calls a small rim at the left upper lobe
    tumour infection, most of the little infection it finds there (2.0.0 called the tumour and the lung
    around it, 46 mL); covid-chest-ct: the infection is spread over both lungs."""
    tumour = segment_file(shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-L.nii.gz"), bundled_model,
                          device="cpu")
    covid = segment_file(shared_path("covid-chest-ct", "MIDRC-RICORD-1A-419639-001012.nii.gz"), bundled_model,
                         device="cpu")
    assert [w for w in tumour.warnings if "one focal lesion in the left lung" in w], tumour.warnings
    assert not [w for w in covid.warnings if "focal lesion" in w], covid.warnings
    lesion = tumour.largest_lesion
    assert lesion.side == "left" and 5 <= lesion.ml < 30 and lesion.share >= 0.5 and lesion.extent_mm <= 80
    assert tumour.summary()["largest_infection_lesion"] == lesion.to_dict()
    assert covid.largest_lesion.extent_mm > 120 and covid.largest_lesion.ml > 100
