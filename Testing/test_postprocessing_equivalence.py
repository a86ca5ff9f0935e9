"""The fast post-processing (boxes, labelled hole filling, dilation around the specks only, histogram
median) gives exactly what the plain whole-grid algorithm gives, on synthetic chests with clutter and,
when the real data is there, on the bundled model's output for a real chest CT.

``whole_grid_postprocess`` below is that plain algorithm, written the straightforward way with SciPy
(it was the engine's implementation before the speed work); the steps that did not change are shared.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.inference import predict_volume
from CovidInfectionSegLib.model_package import default_model_path, load_model_package
from CovidInfectionSegLib.postprocessing import (
    INFECTION,
    LEFT_LUNG,
    RIGHT_LUNG,
    WITHOUT_ANATOMY_CHECKS,
    Component,
    PostprocessingSettings,
    body_midline_x,
    bounding_box,
    drop_unaerated_infection,
    ellipsoid_structure,
    exact_median,
    fill_holes,
    keep_infection_near_lungs,
    large_components_first,
    postprocess,
    relabel_solid_nodules,
    remove_border_connected,
    remove_small_components,
    split_left_right,
)
from shared_data import shared_path

LUNG, INFECTED = 1, 2
# The plain algorithm predates step 0 (gas pockets, dense false lung) and the wrapped-in-tissue and
# outside-the-body checks of step 1; the speed work is compared without them (WITHOUT_ANATOMY_CHECKS).


def whole_grid_postprocess(classes, intensities, spacing_xyz, intensities_in_hu=True, settings=PostprocessingSettings()):
    """(labels, side, notes) by the plain algorithm on the whole grid."""
    spacing = np.asarray(spacing_xyz, dtype=float)[::-1]
    notes: list[str] = []
    lung_voxels = classes == LUNG
    lungs = plain_lung_selection(lung_voxels | (classes == INFECTED), lung_voxels, intensities, spacing,
                                 intensities_in_hu, settings, notes)
    side = np.zeros(classes.shape, dtype=np.uint8)
    if lungs.any():
        midline = body_midline_x(intensities, np.flatnonzero(lungs.any(axis=(1, 2))),
                                 np.flatnonzero(lungs.any(axis=(0, 1))), intensities_in_hu)
        side = plain_split(lungs, midline, spacing, settings)
        for value in (RIGHT_LUNG, LEFT_LUNG):
            filled = plain_fill_holes(side == value)
            side[filled & (side == 0)] = value
    infection = plain_keep_near(classes == INFECTED, side, spacing, settings)
    infection = remove_small_components(infection, settings.min_infection_mm3 / float(np.prod(spacing)))
    if intensities_in_hu:
        drop_unaerated_infection(infection, side, intensities, spacing, settings, notes)
        relabel_solid_nodules(infection, intensities, spacing, settings, notes)
    labels = side.copy()
    labels[infection] = INFECTION
    return labels, side, notes


def plain_lung_selection(candidate, lung_voxels, intensities, spacing, intensities_in_hu, settings, notes):
    selected = np.zeros(candidate.shape, dtype=bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    candidate = candidate.copy()
    outside = remove_border_connected(candidate)
    if outside:
        notes.append(f"dropped {outside * voxel_ml:.0f} mL connected to the image border (air outside the body)")
    components, _count = ndimage.label(candidate)
    sizes, order = large_components_first(components, voxel_ml, settings, notes)
    kept = 0
    for index in order:
        if kept == 2:
            break
        mask = components == index
        if intensities_in_hu:
            inside_lung = mask & lung_voxels
            median = float(np.median(intensities[inside_lung if inside_lung.any() else mask]))
            if median > settings.max_lung_median_hu:
                notes.append(
                    f"dropped a {sizes[index] * voxel_ml:.0f} mL component with median {median:.0f} HU (not "
                    f"air-filled: above {settings.max_lung_median_hu:g} HU, e.g. bowel or soft tissue)"
                )
                continue
        selected |= mask
        kept += 1
    return selected


def plain_split(lungs, midline_x, spacing, settings):
    """The lungs labelled again on the whole grid (the fast path reuses the selected components)."""
    components, _count = ndimage.label(lungs)
    found = [Component(sub, components[sub] == index) for index, sub in enumerate(ndimage.find_objects(components), 1)]
    return split_left_right(found, lungs.shape, midline_x, spacing, settings)


def plain_fill_holes(mask):
    """Per slice, then in 3D, in the mask's bounding box."""
    filled = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return filled
    sub = mask[box].copy()
    for z in range(sub.shape[0]):
        if sub[z].any():
            sub[z] = ndimage.binary_fill_holes(sub[z])
    filled[box] = ndimage.binary_fill_holes(sub)
    return filled


def plain_keep_near(infection, side, spacing, settings):
    lungs = side > 0
    kept = infection & lungs
    outside = infection & ~lungs
    if not lungs.any() or not outside.any():
        return kept
    structure = ellipsoid_structure(settings.infection_margin_mm, spacing)
    for value in (RIGHT_LUNG, LEFT_LUNG):
        near = ndimage.binary_dilation(side == value, structure=structure) & outside
        side[near] = value
        outside &= ~near
        kept |= near
    return kept


def cluttered_chest(seed: int, shape=(40, 96, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Network-like classes and HU: two lungs (touching for some seeds) with vessels, infection inside,
    at their edges and scattered far away, lung specks, air at the image border, a soft-tissue 'lung'."""
    rng = np.random.default_rng(seed)
    depth, rows, cols = shape
    z, y, x = np.ogrid[:depth, :rows, :cols]
    gap = rng.integers(-6, 8)
    classes = np.zeros(shape, dtype=np.uint8)
    hu = rng.normal(40, 15, shape).astype(np.int16)
    for centre in (cols / 2 - gap / 2 - 22, cols / 2 + gap / 2 + 22):
        lung = ((z - depth / 2) / (depth / 2 - 2)) ** 2 + ((y - rows / 2) / 34) ** 2 + ((x - centre) / 22) ** 2 <= 1
        classes[lung] = LUNG
        hu[lung] = rng.normal(-850, 30, np.count_nonzero(lung)).astype(np.int16)
    noise = rng.random(shape)
    classes[(noise < 0.02) & (classes == LUNG)] = 0  # vessels: holes
    radius = int(rng.integers(2, 4))
    offsets = np.ogrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    ball = sum(offset**2 for offset in offsets) <= radius**2
    blobs = ndimage.binary_dilation(noise > 0.9997, structure=ball)
    classes[blobs] = INFECTED  # inside, across the edges and far outside the lungs
    hu[blobs] = rng.normal(-300, 150, np.count_nonzero(blobs)).astype(np.int16)
    blob_labels, count = ndimage.label(blobs)
    solid = np.isin(blob_labels, np.arange(1, count + 1, 2))  # every other blob a solid nodule
    hu[solid] = rng.normal(20, 30, np.count_nonzero(solid)).astype(np.int16)
    classes[(noise > 0.9985) & ~blobs] = LUNG  # specks of "lung"
    classes[:, :3, 20:60] = LUNG  # air along the anterior border
    hu[:, :3, 20:60] = -1000
    tissue = ((z - depth / 2) / 6) ** 2 + ((y - rows * 0.85) / 6) ** 2 + ((x - cols / 2) / 8) ** 2 <= 1
    classes[tissue] = LUNG  # a soft-tissue component called lung (bowel)
    return classes, hu


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("spacing", [(1.5, 1.5, 3.0), (0.8, 0.8, 1.0)], ids=["thick", "thin"])
def test_fast_postprocessing_equals_the_whole_grid_algorithm(seed: int, spacing) -> None:
    classes, hu = cluttered_chest(seed)
    settings = replace(WITHOUT_ANATOMY_CHECKS, min_lung_component_ml=1.0, min_infection_mm3=20.0)
    for intensities in (hu, hu.astype(np.float32)):
        for in_hu in (True, False):
            fast = postprocess(classes, intensities, spacing, intensities_in_hu=in_hu, settings=settings)
            labels, side, notes = whole_grid_postprocess(classes, intensities, spacing, in_hu, settings)
            np.testing.assert_array_equal(fast.labels, labels)
            np.testing.assert_array_equal(fast.side, side)
            assert fast.notes == notes
    assert np.count_nonzero(labels == INFECTION) > 0 and np.count_nonzero(labels == LEFT_LUNG) > 0


def test_the_clutter_exercises_every_rule() -> None:
    found = " ".join(" ".join(whole_grid_postprocess(*cluttered_chest(seed), (1.5, 1.5, 3.0),
                                                     settings=PostprocessingSettings(min_lung_component_ml=1.0))[2])
                     for seed in range(6))
    for rule in ("image border", "under 1 mL", "not air-filled", "are nodules"):
        assert rule in found


def test_hole_filling_equals_scipy_per_slice_and_in_3d() -> None:
    rng = np.random.default_rng(3)
    for density in (0.3, 0.55, 0.7):
        mask = ndimage.binary_opening(rng.random((14, 40, 50)) < density)
        np.testing.assert_array_equal(fill_holes(mask), plain_fill_holes(mask))


def test_infection_kept_near_the_lungs_equals_the_whole_grid_dilation() -> None:
    classes, hu = cluttered_chest(1)
    spacing = np.array([3.0, 1.5, 1.5])
    side = np.zeros(classes.shape, np.uint8)
    side[:, :, :56][classes[:, :, :56] == LUNG] = RIGHT_LUNG
    side[:, :, 56:][classes[:, :, 56:] == LUNG] = LEFT_LUNG
    settings = PostprocessingSettings()
    plain_side = side.copy()
    fast = keep_infection_near_lungs(classes == INFECTED, side, spacing, settings)
    np.testing.assert_array_equal(fast, plain_keep_near(classes == INFECTED, plain_side, spacing, settings))
    np.testing.assert_array_equal(side, plain_side)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 1001])
def test_exact_median_is_numpys(size: int) -> None:
    values = np.random.default_rng(size).integers(-1024, 3000, size).astype(np.int16)
    assert exact_median(values) == float(np.median(values))
    assert exact_median(values.astype(np.float32)) == float(np.median(values.astype(np.float32)))
    extremes = np.array([-32768, 32767, 32767, -5][: max(2, size % 4)], dtype=np.int16)  # a range wider than int16
    assert exact_median(extremes) == float(np.median(extremes))
    assert exact_median(np.array([-128, 127, 127], dtype=np.int8)) == 127.0


def test_bounding_box_is_the_tightest_box() -> None:
    mask = np.zeros((9, 10, 11), dtype=bool)
    mask[2, 3, 4] = mask[6, 8, 5] = mask[4, 4, 9] = True
    assert bounding_box(mask) == (slice(2, 7), slice(3, 9), slice(4, 10))
    assert bounding_box(mask, pad=np.array([3, 1, 1]), shape=mask.shape) == (slice(0, 9), slice(2, 10), slice(3, 11))
    assert bounding_box(np.zeros((3, 3), bool)) is None


def test_real_chest_ct_is_post_processed_as_by_the_whole_grid_algorithm() -> None:
    path = shared_path("lidc-idri-chest-ct", "LIDC-IDRI-0001.nii.gz")
    model = load_model_package(default_model_path())
    canonical = to_canonical(read_image(path))
    volume = sitk.GetArrayViewFromImage(canonical)[60:100]  # the lung bases, with the upper abdomen
    classes = predict_volume(volume, model, "cpu", precision="fp32")
    settings = WITHOUT_ANATOMY_CHECKS
    fast = postprocess(classes, volume, canonical.GetSpacing(), settings=settings)
    labels, side, notes = whole_grid_postprocess(classes, volume, canonical.GetSpacing(), settings=settings)
    np.testing.assert_array_equal(fast.labels, labels)
    np.testing.assert_array_equal(fast.side, side)
    assert fast.notes == notes
    assert np.count_nonzero(labels == RIGHT_LUNG) > 100_000 and np.count_nonzero(labels == INFECTION) > 0
