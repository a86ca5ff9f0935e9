"""Post-processing on synthetic network outputs: lung components, left/right split in LPS (also for
touching lungs), hole filling, physical speck removal, infection kept only in and near the lungs."""

from __future__ import annotations

import numpy as np
import pytest

from CovidInfectionSegLib.postprocessing import (
    INFECTION,
    LEFT_LUNG,
    MAX_NODULE_ML,
    RIGHT_LUNG,
    SMALL_SECOND_COMPONENT,
    WITHOUT_ANATOMY_CHECKS,
    WITHOUT_NODULE_CHECK,
    PostprocessingSettings,
    ellipsoid_structure,
    postprocess,
)

LUNG, INFECTED = 1, 2  # network classes


def ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, size) for size in shape)]
    return sum(((grid - c) / r) ** 2 for grid, c, r in zip(grids, centre, radii)) <= 1


def chest(shape=(20, 60, 80), gap: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Classes, HU and the true right/left masks of two lungs either side of x = 40 (LPS: right has small x)."""
    depth, rows, cols = shape
    half_gap = gap / 2
    right = ellipsoid(shape, (depth / 2, rows / 2, cols / 2 - half_gap - 14), (depth / 2 - 1, rows / 2 - 8, 14))
    left = ellipsoid(shape, (depth / 2, rows / 2, cols / 2 + half_gap + 14), (depth / 2 - 1, rows / 2 - 8, 14))
    classes = np.zeros(shape, dtype=np.uint8)
    classes[right | left] = LUNG
    hu = np.full(shape, 40.0, dtype=np.float32)
    hu[right | left] = -850.0
    return classes, hu, right, left


SPACING = (1.5, 1.5, 3.0)  # x, y, z mm


def test_two_separate_lungs_are_labelled_right_and_left_in_lps() -> None:
    classes, hu, right, left = chest()
    result = postprocess(classes, hu, SPACING)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)
    np.testing.assert_array_equal(result.labels == LEFT_LUNG, left)
    np.testing.assert_array_equal(result.side, result.labels)
    # the region holds every label, so the pipeline measures inside it only
    outside = np.ones(classes.shape, dtype=bool)
    outside[result.region] = False
    assert result.region_side.shape == result.region_labels.shape and not result.labels[outside].any()


def test_touching_lungs_are_split_at_the_midline() -> None:
    classes, hu, right, left = chest(gap=-4)  # overlapping: one component
    bridge = ellipsoid(classes.shape, (10, 30, 40), (6, 10, 6))  # plus a thick junction between them
    classes[bridge] = LUNG
    hu[bridge] = -850.0
    result = postprocess(classes, hu, SPACING)
    assert np.count_nonzero(result.labels == RIGHT_LUNG) > 0 and np.count_nonzero(result.labels == LEFT_LUNG) > 0
    x = np.arange(classes.shape[2])
    assert np.all(x[np.any(result.labels == RIGHT_LUNG, axis=(0, 1))] < 41)
    assert np.all(x[np.any(result.labels == LEFT_LUNG, axis=(0, 1))] >= 39)
    only_right = right & ~left
    only_left = left & ~right
    assert np.count_nonzero(result.labels[only_right] == RIGHT_LUNG) / np.count_nonzero(only_right) > 0.97
    assert np.count_nonzero(result.labels[only_left] == LEFT_LUNG) / np.count_nonzero(only_left) > 0.97


def test_touching_lungs_split_at_the_thinnest_column_not_the_body_centre() -> None:
    # the lungs touch at x = 30..33 while the body centre is at x = 40: the cut must follow the junction
    shape = (12, 50, 80)
    right = ellipsoid(shape, (6, 25, 18), (5, 18, 14))
    left = ellipsoid(shape, (6, 25, 48), (5, 18, 17))
    junction = np.zeros(shape, dtype=bool)
    junction[3:9, 23:27, 28:36] = True
    classes = np.zeros(shape, dtype=np.uint8)
    classes[right | left | junction] = LUNG
    hu = np.full(shape, 40.0, dtype=np.float32)
    hu[classes > 0] = -850.0
    result = postprocess(classes, hu, (1.0, 1.0, 2.0))
    assert np.count_nonzero(result.labels[right & ~junction] == RIGHT_LUNG) / np.count_nonzero(right & ~junction) > 0.99
    assert np.count_nonzero(result.labels[left & ~junction] == LEFT_LUNG) / np.count_nonzero(left & ~junction) > 0.99


def test_a_single_lung_is_not_split() -> None:
    classes, hu, right, left = chest()
    classes[left] = 0
    hu[left] = 40.0
    result = postprocess(classes, hu, SPACING)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)
    assert not np.any(result.labels == LEFT_LUNG)


def test_small_components_are_dropped_and_only_two_largest_kept() -> None:
    classes, hu, right, left = chest(shape=(20, 60, 120))
    speck = ellipsoid(classes.shape, (10, 5, 60), (1, 1, 1))  # well under 20 mL
    third = ellipsoid(classes.shape, (10, 30, 105), (8, 12, 8))  # ~ 11 mL x 6.75 > 20 mL but the smallest
    for mask in (speck, third):
        classes[mask] = LUNG
        hu[mask] = -850.0
    result = postprocess(classes, hu, SPACING)
    assert not np.any(result.labels[speck]) and not np.any(result.labels[third])
    assert np.all(result.labels[right | left] > 0)
    assert any("under 20 mL" in note for note in result.notes)


def test_components_that_are_not_air_filled_are_rejected() -> None:
    classes, hu, right, left = chest()
    hu[left] = -100.0  # e.g. bowel or soft tissue called lung
    assert not np.any(postprocess(classes, hu, SPACING).labels[left])  # step 0 takes it (dense, far from air)
    result = postprocess(classes, hu, SPACING, settings=PostprocessingSettings(max_dense_lung_border=0))
    assert not np.any(result.labels[left])
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)
    assert any("median -100 HU (not air-filled" in note for note in result.notes)
    # without HU (e.g. MR-like data) the air check cannot apply: the component is kept
    kept = postprocess(classes, hu, SPACING, intensities_in_hu=False)
    np.testing.assert_array_equal(kept.labels == LEFT_LUNG, left)


def test_air_outside_the_body_is_rejected() -> None:
    classes, hu, right, left = chest()
    outside = np.zeros(classes.shape, dtype=bool)
    outside[:, :4, :] = True  # a band of air along the anterior image border in every slice
    classes[outside] = LUNG
    hu[outside] = -1000.0
    result = postprocess(classes, hu, SPACING)
    assert not np.any(result.labels[outside])
    assert np.all(result.labels[right | left] > 0)


def test_holes_in_a_lung_are_filled() -> None:
    classes, hu, right, left = chest()
    vessel = np.zeros(classes.shape, dtype=bool)
    vessel[:, 28:32, 24:27] = True  # a vessel running through the right lung, open at both ends in 3D
    vessel &= right
    enclosed = ellipsoid(classes.shape, (10, 30, 60), (2, 3, 3))  # a nodule inside the left lung
    classes[vessel | enclosed] = 0
    result = postprocess(classes, hu, SPACING)
    assert np.all(result.labels[vessel] == RIGHT_LUNG)
    assert np.all(result.labels[enclosed] == LEFT_LUNG)


def test_the_mediastinum_between_touching_lungs_is_not_filled() -> None:
    # lungs touching in front of and behind the mediastinum enclose it in every slice
    classes, hu, right, left = chest(gap=-2)
    mediastinum = ellipsoid(classes.shape, (10, 30, 40), (12, 10, 5)) & ~(right | left)
    assert np.count_nonzero(mediastinum) > 0
    result = postprocess(classes, hu, SPACING)
    assert np.count_nonzero(result.labels[mediastinum]) == 0


def speck_result(spacing: tuple[float, float, float], speck_mm3: float) -> bool:
    """Is an infection speck of about ``speck_mm3`` kept inside a lung, at this voxel spacing?"""
    spacing_zyx = np.array(spacing[::-1])
    shape = tuple(int(round(120 / step)) for step in spacing_zyx)  # a 120 mm cube
    centre = tuple(size / 2 for size in shape)
    lung = ellipsoid(shape, centre, tuple(50 / step for step in spacing_zyx))
    radius_mm = (3 * speck_mm3 / (4 * np.pi)) ** (1 / 3)
    speck = ellipsoid(shape, centre, tuple(radius_mm / step for step in spacing_zyx))
    classes = np.where(lung, LUNG, 0).astype(np.uint8)
    classes[speck] = INFECTED
    hu = np.where(lung, -850.0, 40.0).astype(np.float32)
    result = postprocess(classes, hu, spacing)
    assert np.all(result.side[speck] > 0)  # a removed speck inside the lung becomes lung
    return bool(np.any(result.labels == INFECTION))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.6, 0.6, 2.5)], ids=["1mm-iso", "0.6x0.6x2.5mm"])
def test_speck_removal_is_physical_not_per_voxel(spacing) -> None:
    # the default minimum is 50 mm3: a 15 mm3 speck goes, a 400 mm3 lesion stays, at either spacing
    assert PostprocessingSettings().min_infection_mm3 == 50.0
    assert not speck_result(spacing, 15.0)
    assert speck_result(spacing, 400.0)


def test_infection_far_from_the_lungs_is_removed_and_near_it_kept() -> None:
    classes, hu, right, left = chest()
    inside = ellipsoid(classes.shape, (10, 30, 26), (3, 4, 4)) & right
    near = np.zeros(classes.shape, dtype=bool)
    far = np.zeros(classes.shape, dtype=bool)
    # just outside the left lung's lateral edge (x = 68): 1 voxel = 1.5 mm away, within the 3 mm margin
    near[8:13, 26:35, 69:70] = True
    far[8:13, 2:8, 36:44] = True  # anterior, between the lungs, far from both (e.g. a bright structure)
    classes[inside] = INFECTED
    classes[near | far] = INFECTED
    hu[near] = -400.0  # ground glass at the lung's edge (at soft-tissue HU it would be a small solid nodule)
    result = postprocess(classes, hu, SPACING)
    assert np.all(result.labels[inside] == INFECTION)
    assert np.all(result.labels[near] == INFECTION) and np.all(result.side[near] == LEFT_LUNG)
    assert not np.any(result.labels[far])
    assert not np.any(result.labels[right & ~inside] == INFECTION)


def test_infection_in_fat_with_a_thin_lung_rim_is_dropped_but_a_lesion_in_aerated_lung_kept() -> None:
    # the model's false call below the diaphragm: "infection" in fat (-100 HU) wrapped in a thin "lung" rim
    classes, hu, right, left = chest(shape=(20, 60, 120))
    lesion = ellipsoid(classes.shape, (10, 30, 26), (3, 5, 5)) & right
    classes[lesion] = INFECTED
    hu[lesion] = -400.0
    rim = ellipsoid(classes.shape, (10, 30, 105), (6, 10, 10))
    fat_call = ellipsoid(classes.shape, (10, 30, 105), (5, 8, 8))
    classes[rim] = LUNG
    classes[fat_call] = INFECTED
    hu[rim] = -100.0
    classes[8:12, 28:32, 88:97] = LUNG  # joined to the left lung, as a lung base would be
    hu[8:12, 28:32, 88:97] = -850.0
    result = postprocess(classes, hu, SPACING, settings=PostprocessingSettings(min_lung_component_ml=0.5))
    assert np.all(result.labels[lesion] == INFECTION)
    assert not np.any(result.labels[fat_call])
    assert any("no aerated lung" in note for note in result.notes)
    # without HU (min-max data) the rule cannot apply and the call stays
    kept = postprocess(
        classes, hu, SPACING, intensities_in_hu=False, settings=PostprocessingSettings(min_lung_component_ml=0.5)
    )
    assert np.any(kept.labels[fat_call] == INFECTION)


def test_a_small_solid_nodule_is_lung_while_ground_glass_and_large_consolidation_stay_infection() -> None:
    classes, hu, right, left = chest(shape=(24, 70, 90))
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    nodule = ellipsoid(classes.shape, (12, 35, 22), (2, 4, 4)) & right  # solid, about 0.8 mL
    ground_glass = ellipsoid(classes.shape, (6, 35, 22), (2, 4, 4)) & right
    consolidation = ellipsoid(classes.shape, (12, 35, 65), (5, 12, 11)) & left  # solid, over a 30 mm ball
    assert np.count_nonzero(consolidation) * voxel_ml > MAX_NODULE_ML
    classes[nodule | ground_glass | consolidation] = INFECTED
    hu[nodule | consolidation] = 30.0
    hu[ground_glass] = -600.0
    result = postprocess(classes, hu, SPACING)
    assert np.all(result.labels[nodule] == RIGHT_LUNG), "the nodule is lung of its side, not background"
    assert np.all(result.labels[ground_glass] == INFECTION)
    assert np.all(result.labels[consolidation] == INFECTION)
    assert any("are nodules, not pneumonia" in note for note in result.notes), result.notes
    off = postprocess(classes, hu, SPACING, settings=WITHOUT_NODULE_CHECK)
    assert np.all(off.labels[nodule] == INFECTION)
    np.testing.assert_array_equal(off.labels[~nodule], result.labels[~nodule])
    without_hu = postprocess(classes, hu, SPACING, intensities_in_hu=False)  # min-max data: no HU, no rule
    assert np.all(without_hu.labels[nodule] == INFECTION)


def test_a_nodule_is_solid_by_its_share_of_voxels_above_minus_100_hu() -> None:
    classes, hu, right, left = chest(shape=(24, 70, 90))
    lesion = ellipsoid(classes.shape, (12, 35, 22), (3, 6, 6)) & right
    classes[lesion] = INFECTED
    hu[lesion] = -600.0
    z, y, x = np.nonzero(lesion)
    order = np.argsort(x, kind="stable")
    for share, expected in ((0.2, INFECTION), (0.3, RIGHT_LUNG)):
        hu[lesion] = -600.0
        solid = order[: int(share * order.size)]
        hu[z[solid], y[solid], x[solid]] = -50.0
        result = postprocess(classes, hu, SPACING)
        assert np.all(result.labels[lesion] == expected), f"{share:.0%} solid"


def test_infection_is_counted_on_its_lung_side() -> None:
    classes, hu, right, left = chest()
    lesion = ellipsoid(classes.shape, (10, 30, 54), (4, 6, 5)) & left
    classes[lesion] = INFECTED
    result = postprocess(classes, hu, SPACING)
    assert np.all(result.labels[lesion] == INFECTION)
    assert np.all(result.side[lesion] == LEFT_LUNG)
    np.testing.assert_array_equal(result.side == LEFT_LUNG, left)


def test_nothing_in_nothing_out() -> None:
    classes = np.zeros((10, 20, 20), dtype=np.uint8)
    result = postprocess(classes, np.zeros(classes.shape, np.float32), SPACING)
    assert not result.labels.any() and not result.side.any()
    assert result.region_side.size == 0 and result.region_labels.size == 0


def test_ellipsoid_structure_is_physical() -> None:
    structure = ellipsoid_structure(3.0, np.array([3.0, 1.0, 1.0]))
    assert structure.shape == (3, 7, 7)
    assert structure[1, 3, 0] and structure[0, 3, 3] and not structure[0, 3, 2]


def taken_out(classes, hu, region, note, **switched_off):
    """Post-processes with default settings, asserting that ``region`` is not lung and the step said
    ``note``; asserts that the region stays lung (all of it) with the step switched off."""
    result = postprocess(classes, hu, SPACING)
    assert not np.any(result.labels[region])
    assert any(note in text for text in result.notes), result.notes
    kept = postprocess(classes, hu, SPACING, settings=PostprocessingSettings(**switched_off))
    assert np.all(kept.labels[region] > 0), f"with {switched_off} the region stays lung"
    return result


def _stomach_below_left_lung(classes, hu, left):
    """An air-filled stomach under the left lung, touching its base, that the network called lung."""
    stomach = ellipsoid(classes.shape, (2, 30, 57), (3.5, 13, 13)) & ~left
    classes[stomach] = LUNG
    hu[stomach] = -1000.0
    return stomach


def test_an_air_filled_stomach_touching_the_lung_is_not_lung() -> None:
    classes, hu, right, left = chest()
    stomach = _stomach_below_left_lung(classes, hu, left)
    assert (stomach & ndimage_dilate(left)).any(), "the phantom's stomach touches the lung"
    result = taken_out(classes, hu, stomach, "gas pockets not surrounded by lung", max_gas_pocket_lung_border=0)
    kept_left = result.labels == LEFT_LUNG
    assert np.count_nonzero(kept_left & ~left) == 0
    lost = left & ~kept_left
    from scipy import ndimage

    distance_to_stomach = ndimage.distance_transform_edt(~stomach, sampling=np.array(SPACING)[::-1])
    assert lost.sum() < 0.05 * left.sum() and np.all(distance_to_stomach[lost] <= 3.0 + 1.5), \
        "the lung loses only what lies within the 3 mm wall around the stomach (and a voxel cut off by it)"
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)


def chest_above_a_stomach():
    """:func:`chest` with the lungs ending at z = 12, and the mask of the slices below them (where a stomach goes,
    under the left lung, below the diaphragm)."""
    classes, hu, right, left = chest(shape=(30, 60, 80))
    below = np.zeros(classes.shape, dtype=bool)
    below[:12] = True
    classes[below], hu[below] = 0, 40.0
    return classes, hu, right & ~below, left & ~below, below


def test_the_rim_of_an_air_fluid_level_below_the_lung_is_not_lung() -> None:
    """covid-chest-ct: along the stomach's air-fluid level the gas reads a little denser than air for a
    voxel or two beyond the 3 mm wall; the network called that strip lung, joined to the lung's base."""
    from scipy import ndimage

    classes, hu, right, left, _below = chest_above_a_stomach()
    stomach = ellipsoid(classes.shape, (5, 30, 57), (5.5, 12, 12))
    rows = np.arange(classes.shape[1])[None, :, None]
    gas, strip, fluid = stomach & (rows < 30), stomach & (rows >= 30) & (rows < 34), stomach & (rows >= 34)
    hu[gas], hu[strip], hu[fluid] = -1000.0, -900.0, 10.0
    classes[gas | strip] = LUNG
    climb = np.zeros(classes.shape, dtype=bool)
    climb[9:12, 30:34, 57] = True  # the strip climbs the stomach's wall to the lung's base
    classes[climb], hu[climb] = LUNG, -900.0
    spacing_zyx = np.array(SPACING)[::-1]
    labelled, _count = ndimage.label(classes > 0)
    assert labelled[strip].min() == labelled[left].max(), "the strip and the left lung are one 3D component"
    beyond_wall = (strip | climb) & (ndimage.distance_transform_edt(~gas, sampling=spacing_zyx) > 3.0)
    assert np.any(beyond_wall & strip), "part of the strip lies beyond the 3 mm wall"

    result = taken_out(classes, hu, beyond_wall, "gas pockets not surrounded by lung", max_pocket_rim_mm=0)
    assert not np.any(result.labels[stomach]), "gas, wall and rim of the stomach: none of it is lung"
    note = next(text for text in result.notes if "gas pockets" in text)
    rim_ml = float(note.split("mL of it their rims")[0].split()[-1])
    assert rim_ml == pytest.approx(np.count_nonzero(beyond_wall) * np.prod(SPACING) / 1000.0, abs=0.05), result.notes
    np.testing.assert_array_equal(result.labels == LEFT_LUNG, left)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)


def test_a_bulla_inside_the_lung_stays_lung() -> None:
    classes, hu, right, left = chest()
    bulla = ellipsoid(classes.shape, (10, 30, 20), (3, 6, 6))
    assert np.all(right[bulla])
    hu[bulla] = -1000.0
    result = postprocess(classes, hu, SPACING)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)


def ndimage_dilate(mask):
    from scipy import ndimage

    return ndimage.binary_dilation(mask)


def test_a_contrast_filled_stomach_joined_to_the_lung_is_not_lung() -> None:
    classes, hu, right, left, below = chest_above_a_stomach()
    stomach = ellipsoid(classes.shape, (4, 30, 57), (4, 12, 12))
    through_diaphragm = ellipsoid(classes.shape, (10, 30, 57), (2.5, 4, 4)) & below & ~stomach
    classes[stomach], hu[stomach] = LUNG, 150.0  # oral contrast: dense, not gas
    classes[through_diaphragm] = LUNG  # the network's lung runs on into it, as on LIDC-IDRI-0003
    result = taken_out(classes, hu, stomach, "dense tissue called lung", max_dense_lung_border=0)
    assert np.all(result.labels[left] == LEFT_LUNG)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)


def test_dense_tissue_inside_the_lung_stays_lung() -> None:
    classes, hu, right, left = chest()
    consolidation = ellipsoid(classes.shape, (10, 30, 20), (3, 8, 8))  # 9 x 12 x 12 mm radii, in the right lung
    assert np.all(right[consolidation])
    hu[consolidation] = 30.0  # solid, and called lung rather than infection
    result = postprocess(classes, hu, SPACING)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)
    assert not any("dense tissue" in note for note in result.notes)


def test_air_and_a_cushion_between_the_back_and_the_table_are_not_lung() -> None:
    classes, hu, right, left = chest(shape=(30, 80, 100), gap=-4)  # one component: a second would be kept
    gap = np.zeros(classes.shape, dtype=bool)
    gap[:, 74:79, 5:95] = True  # room air under the back, closed in by the table
    hu[gap] = -1000.0
    cushion = np.zeros(classes.shape, dtype=bool)
    cushion[:, 76:78, 10:90] = True  # foam: as light as lung, not gas; 32 mL against 360 mL of lungs
    hu[cushion] = -900.0
    classes[cushion] = LUNG
    assert not (cushion & (right | left)).any()
    result = taken_out(classes, hu, cushion, "not wrapped in tissue", max_light_shell_fraction=1.0)
    assert np.all(result.labels[right | left] > 0)


def test_two_lungs_the_network_under_segmented_are_both_kept() -> None:
    classes, hu, right, left = chest()
    around = ndimage_dilate(ndimage_dilate(right | left)) & ~(right | left)
    hu[around] = -850.0  # aerated lung the network left out: each lung's border is light
    result = postprocess(classes, hu, SPACING)
    np.testing.assert_array_equal(result.labels == RIGHT_LUNG, right)
    np.testing.assert_array_equal(result.labels == LEFT_LUNG, left)


def _patient_on_a_cushion():
    """A chest (40 HU) in room air, its lungs joined in one component, and a foam cushion (-900 HU) under
    it that the network called lung."""
    shape = (20, 90, 100)
    classes = np.zeros(shape, dtype=np.uint8)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[:, 2:62, 5:95] = 40.0
    lungs = ellipsoid(shape, (10, 32, 32), (9, 22, 20)) | ellipsoid(shape, (10, 32, 68), (9, 22, 20))
    classes[lungs], hu[lungs] = LUNG, -850.0
    cushion = np.zeros(shape, dtype=bool)
    cushion[:, 64:72, 30:70] = True
    classes[cushion], hu[cushion] = LUNG, -900.0
    return classes, hu, lungs, cushion


def test_a_cushion_outside_the_body_is_not_lung_whatever_its_size() -> None:
    classes, hu, lungs, cushion = _patient_on_a_cushion()
    assert cushion.sum() > 1.5 * SMALL_SECOND_COMPONENT * lungs.sum(), "too large for the check of small components"
    result = taken_out(classes, hu, cushion, "lying in air outside the body", max_outside_air_share=1.0)
    assert np.all(result.labels[lungs] > 0)


def test_without_the_anatomy_checks_the_cushion_stays_lung() -> None:
    """WITHOUT_ANATOMY_CHECKS (what `wholescan --no-anatomy-checks` measures against) turns the checks off."""
    classes, hu, lungs, cushion = _patient_on_a_cushion()
    assert not np.any(postprocess(classes, hu, SPACING).labels[cushion])
    result = postprocess(classes, hu, SPACING, settings=WITHOUT_ANATOMY_CHECKS)
    assert np.all(result.labels[cushion] > 0) and np.all(result.labels[lungs] > 0)


def test_a_component_walled_in_by_the_body_is_not_taken_for_outside_air() -> None:
    classes, hu, lungs, cushion = _patient_on_a_cushion()
    hu[:, 62:90, 5:95] = 40.0  # the same "cushion", now inside the body (an air-filled lung-like space)
    hu[cushion] = -900.0
    result = postprocess(classes, hu, SPACING)
    assert not any("outside the body" in note for note in result.notes), result.notes
    assert np.all(result.labels[cushion] > 0)
