"""The classical HU lung mask: lungs in, trachea, stomach, bowel gas and room air out."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib.imageio import read_image, to_canonical
from covidseg_training.classical_lung import classical_lung_mask, distance_outside_mm
from shared_data_paths import shared_path
from whole_chest import SPACING_ZYX, whole_chest


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_lungs_found_and_gas_below_the_diaphragm_left_out():
    chest = whole_chest()
    mask = classical_lung_mask(chest.volume, SPACING_ZYX)
    assert dice(mask, chest.lungs) > 0.95
    assert not (mask & chest.stomach).any(), "the air-filled stomach touching the lung base is not lung"
    assert not (mask & chest.bowel).any()
    above_lungs = chest.trachea & (np.arange(mask.shape[0]) > 42)[:, None, None]
    assert not (mask & above_lungs).any(), "the trachea above the lungs is not lung"


@pytest.mark.parametrize("bridge", [False, True], ids=["apart", "touching-a-lung"])
def test_a_trachea_that_is_not_pure_gas_is_not_lung_but_the_apex_tips_are(bridge):
    """On 5 mm slices of a sharp kernel the trachea reads about -930 HU, not pure gas: the midline tube
    is still taken out, also over two slices where a strip of air joins it to the right lung, and the
    lung tips beside it at the apex stay."""
    chest = whole_chest()
    volume = chest.volume.copy()
    airway = chest.trachea.copy()
    if bridge:
        airway[36:38, 50:52, 48:60] = True
    volume[airway] = -930.0 + np.random.default_rng(1).normal(0, 8, airway.sum())
    mask = classical_lung_mask(volume, SPACING_ZYX)
    # At the carina (z 30-31) the airway joins both lungs within the slice: only the tube above it goes.
    above_carina = chest.trachea & (np.arange(mask.shape[0]) >= 32)[:, None, None]
    assert not (mask & above_carina).any(), "the trachea is not lung"
    assert dice(mask, chest.lungs) > 0.95
    tips = chest.lungs[40]
    assert (mask[40] & tips).sum() > 0.8 * tips.sum(), "the lung tips at the apex are lung"


def test_real_kernels_lungs_end_at_the_same_slice():
    """example-chest-ct: kernel B's trachea reads -930 HU above the apex (kernel L's is pure gas); the
    classical lungs of both kernels end at the same slice (kernel B's went 8 slices higher with it)."""
    masks = {}
    for kernel in "LB":
        volume, spacing = _canonical(shared_path("example-chest-ct", f"Lung_Dx-A0001_kernel-{kernel}.nii.gz"))
        masks[kernel] = classical_lung_mask(volume, spacing)
    tops = {kernel: np.flatnonzero(mask.any(axis=(1, 2)))[-1] for kernel, mask in masks.items()}
    assert tops["L"] == tops["B"]


def test_vessels_are_filled_but_not_an_organ_dome_inside_the_lung():
    """A dense island the size of a vessel or nodule is lung; one the size of the liver dome seen in
    the lung base (or the mediastinum between touching lungs) is not."""
    chest = whole_chest()
    volume = chest.volume.copy()
    z, y, x = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    left = chest.lungs & (x > 64)
    vessel = (z == 26) & ((y - 62) ** 2 + (x - 90) ** 2 <= 1)  # 5 pixels, 0.1 cm2: a vessel seen end on
    dome = (z == 26) & ((y - 62) ** 2 + (x - 38) ** 2 <= 100)  # 317 pixels, 7 cm2, inside the right lung
    volume[vessel | dome] = 40.0
    spacing_yx_cm2 = SPACING_ZYX[1] * SPACING_ZYX[2] / 100.0
    assert dome.sum() * spacing_yx_cm2 > 5.0 > vessel.sum() * spacing_yx_cm2
    mask = classical_lung_mask(volume, SPACING_ZYX)
    assert mask[vessel].all(), "a vessel inside the lung is lung"
    assert not mask[dome].any(), "an organ's dome inside the lung base is not lung"
    assert mask[26][left[26] & ~vessel[26]].mean() > 0.95


def test_no_lung_in_a_scan_without_air_inside_the_body():
    chest = whole_chest()
    volume = np.where(chest.lungs | chest.trachea, 40.0, chest.volume).astype(np.float32)
    volume[chest.stomach | chest.bowel] = 40.0
    assert not classical_lung_mask(volume, SPACING_ZYX).any()


def test_distance_outside_in_millimetres():
    reference = np.zeros((3, 10, 10), dtype=bool)
    reference[:, :, :5] = True
    mask = np.zeros_like(reference)
    mask[1, 5, 8] = True  # 4 voxels right of the reference edge (x = 4)
    distance = distance_outside_mm(mask, reference, (2.0, 1.0, 0.5))
    assert distance[1, 5, 8] == 2.0
    assert distance.sum() == 2.0


def _canonical(path):
    image = sitk.Cast(to_canonical(read_image(path)), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image), image.GetSpacing()[::-1]


def test_real_covid_scan_stomach_is_not_lung():
    """covid-chest-ct: its 17 lowest slices hold an air-filled stomach and bowel and no lung."""
    volume, spacing = _canonical(shared_path("covid-chest-ct", "MIDRC-RICORD-1A-419639-001012.nii.gz"))
    mask = classical_lung_mask(volume, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000
    assert mask[:17].sum() * voxel_ml < 5.0
    assert 2000 < mask.sum() * voxel_ml < 5000


def test_real_abdominal_scan_colon_gas_is_not_lung():
    """The abdominal NIfTI has lung bases only in its top slices; the colon gas below is not lung."""
    volume, spacing = _canonical(shared_path("example-abdominal-ct", "example_ct.nii.gz"))
    mask = classical_lung_mask(volume, spacing)
    lowest_lung_slice = np.flatnonzero(mask.any(axis=(1, 2)))[0]
    assert lowest_lung_slice > 0.85 * len(mask)
    assert mask.sum() * float(np.prod(spacing)) / 1000 < 200
