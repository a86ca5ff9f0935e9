"""Which labelled slices of the PNG export have their volume's neighbouring slices in the data (for an
input with the slices above and below as context)."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg_training.data import DEFAULT_PNG_ROOT, SliceDataset, load_png_export, slice_neighbours


def lung_disc(radius: int, centre_x: int = 32) -> np.ndarray:
    y, x = np.mgrid[:64, :64]
    return ((y - 32) ** 2 + (x - centre_x) ** 2 <= radius ** 2).astype(np.uint8)


def test_neighbours_are_consecutive_slices_of_one_case_with_overlapping_lungs():
    labels = np.stack([lung_disc(20), lung_disc(20), lung_disc(19),   # case a: a run of three
                       lung_disc(8, centre_x=12),                      # case a, after a gap: lungs moved
                       lung_disc(8, centre_x=12),                      # case b: same picture, other case
                       np.zeros((64, 64), np.uint8)])                  # case b: no lung at all
    dataset = SliceDataset(np.zeros_like(labels), labels, np.array(["a", "a", "a", "a", "b", "b"]))
    assert slice_neighbours(dataset).tolist() == [[-1, 1], [0, 2], [1, -1], [-1, -1], [-1, -1], [-1, -1]]
    # a stricter overlap cuts the run where the outline shrank (Dice 0.95 between radius 20 and 19)
    assert slice_neighbours(dataset, min_lung_dice=0.99).tolist()[1] == [0, -1]


@pytest.mark.skipif(not (DEFAULT_PNG_ROOT / "cases.csv").exists(),
                    reason=f"shared PNG export not found at {DEFAULT_PNG_ROOT}")
def test_most_slices_of_the_shared_export_have_both_neighbours():
    dataset = load_png_export()
    neighbours = slice_neighbours(dataset)
    both = (neighbours >= 0).all(axis=1)
    assert 0.9 < both.mean() < 1.0, both.mean()  # 95.0% (1534 of 1614) on 2026-12-02
    previous, following = neighbours[:, 0], neighbours[:, 1]
    has_next = following >= 0
    assert (dataset.cases[has_next] == dataset.cases[following[has_next]]).all()
    assert (previous[following[has_next]] == np.flatnonzero(has_next)).all()
