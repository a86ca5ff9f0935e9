"""The slab-by-slab helpers give what the whole-array operations they replace give, across slab edges."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from CovidInfectionSegLib.measurements import measure
from CovidInfectionSegLib.postprocessing import (
    bounding_box,
    candidate_box,
    component_sizes,
    outside_air_share,
    remove_border_connected,
)
from CovidInfectionSegLib.slabs import SLAB_VOXELS, slabs

# 40 slices of 256 x 256: several slabs, the last one partial.
SHAPE = (40, 256, 256)


def random_blobs(seed: int, shape: tuple[int, ...] = SHAPE, fraction: float = 0.5) -> np.ndarray:
    """A mask of irregular blobs, some touching the border: smoothed noise, thresholded."""
    noise = np.random.default_rng(seed).random(shape)
    smooth = ndimage.uniform_filter(noise, size=(1, 7, 7))
    return smooth > np.quantile(smooth, 1 - fraction)


def test_the_slabs_cover_the_first_axis_once_in_order_and_more_than_one_here() -> None:
    parts = list(slabs(SHAPE))
    assert len(parts) > 2 and np.prod(SHAPE) > SLAB_VOXELS
    assert [index for part in parts for index in range(part.start, part.stop)] == list(range(SHAPE[0]))
    assert list(slabs((3, 1024, 1024))) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least one slice each


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_component_sizes_is_bincount(dtype) -> None:
    components, count = ndimage.label(random_blobs(1))
    components = components.astype(dtype)
    assert count > 100
    np.testing.assert_array_equal(component_sizes(components), np.bincount(components.ravel()))
    np.testing.assert_array_equal(component_sizes(components, count + 10),
                                  np.bincount(components.ravel(), minlength=count + 10))
    # labels only in the last slab: the table grows past what the first slabs needed
    late = np.zeros(SHAPE, dtype=dtype)
    late[-1, :3, :3] = 7
    np.testing.assert_array_equal(component_sizes(late), np.bincount(late.ravel()))


def test_candidate_box_is_the_padded_box_of_lung_or_infection() -> None:
    classes = np.zeros(SHAPE, dtype=np.uint8)
    classes[5:9, 30:60, 200:255] = 1
    classes[33, 100:101, 10:12] = 2
    classes[0, 0, 0] = 4  # another class: not a candidate
    expected = bounding_box((classes == 1) | (classes == 2), pad=np.array([0, 1, 1]), shape=SHAPE)
    assert candidate_box(classes, 1, 2) == expected == (slice(5, 34), slice(29, 102), slice(9, 256))
    assert candidate_box(np.zeros(SHAPE, dtype=np.uint8), 1, 2) is None


def border_connected_reference(plane: np.ndarray) -> np.ndarray:
    """The 4-connected regions of a 2D mask that touch its border, by set membership."""
    regions, _count = ndimage.label(plane)
    touching = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    return np.isin(regions, touching[touching > 0])


def test_remove_border_connected_clears_exactly_the_regions_touching_the_border() -> None:
    mask = random_blobs(2)
    expected = np.stack([plane & ~border_connected_reference(plane) for plane in mask])
    removed = remove_border_connected(mask)
    assert removed == int(np.count_nonzero(random_blobs(2) & ~expected)) > 0
    np.testing.assert_array_equal(mask, expected)
    assert expected.any()  # walled-in regions remain


@pytest.mark.parametrize("limit", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_outside_air_share_decides_as_the_whole_count_and_is_exact_when_over_the_limit(limit) -> None:
    light = random_blobs(3)
    intensities = np.where(light, -900, 40).astype(np.int16)
    box = (slice(4, 31), slice(20, 200), slice(0, 90))
    outside = np.stack([border_connected_reference(plane) for plane in light])[box]
    for seed in range(6):  # components with little, some and much of them outside
        mask = random_blobs(10 + seed, fraction=0.3)[box] & (outside if seed % 3 == 0 else light[box] | (seed % 3 == 1))
        exact = float(np.mean(outside[mask]))
        share = outside_air_share(intensities, box, mask, limit)
        assert (share > limit) == (exact > limit), (seed, share, exact)
        if exact > limit:
            assert share == pytest.approx(exact, abs=1e-12)
        else:
            assert share <= limit
    assert outside_air_share(intensities, box, np.zeros(outside.shape, dtype=bool), 0.5) == 0.0


def test_measure_counts_across_slabs() -> None:
    side = np.zeros(SHAPE, dtype=np.uint8)
    side[:, :, :128] = 1
    side[:, :, 128:] = 2
    side[random_blobs(4, fraction=0.2)] = 0
    infection = random_blobs(5, fraction=0.3)
    spacing = (0.7, 0.8, 2.5)
    result = measure(side, infection, spacing)
    voxel_ml = 0.7 * 0.8 * 2.5 / 1000.0
    for region, value in ((result.right_lung, 1), (result.left_lung, 2)):
        assert region.lung_ml == pytest.approx(np.count_nonzero(side == value) * voxel_ml, rel=1e-12)
        assert region.infection_ml == pytest.approx(np.count_nonzero((side == value) & infection) * voxel_ml, rel=1e-12)
    assert 0 < result.right_lung.infection_ml < result.right_lung.lung_ml
