"""The infection components of a whole-scan result, on hand-made labelmaps with known HU."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from covidseg_training.infection_components import (
    components_csv, components_markdown, infection_components, mask_components,
)

SPACING = (2.0, 1.0, 1.0)  # 2 uL voxels


def scan() -> tuple[np.ndarray, np.ndarray]:
    """Lung at -850 HU with two infection components: a mass (a solid 4 x 6 x 6 core at +30 HU in a
    ground-glass rim) in slices 2-7, and a small ground-glass patch in slices 10-11."""
    labels = np.ones((14, 30, 30), dtype=np.uint8)
    ct = np.full(labels.shape, -850.0)
    labels[2:8, 4:14, 4:14] = 3           # 600 voxels
    ct[2:8, 4:14, 4:14] = -500.0
    ct[3:7, 6:12, 6:12] = 30.0             # 144 solid voxels
    labels[10:12, 20:25, 20:25] = 3        # 50 voxels
    ct[10:12, 20:25, 20:25] = -600.0
    ct[10, 20, 20] = -900.0
    return labels, ct


def test_components_largest_first_with_their_hu_make_up():
    labels, ct = scan()
    nodules = np.zeros(labels.shape, dtype=bool)
    nodules[3:7, 6:12, 6:12] = True
    mass, patch = infection_components(labels, ct, SPACING, nodules)
    assert (mass["rank"], mass["ml"], mass["first_slice"], mass["last_slice"]) == (1, pytest.approx(1.2), 2, 7)
    assert mass["solid_percent"] == pytest.approx(24.0) and mass["ground_glass_percent"] == pytest.approx(76.0)
    assert mass["aerated_percent"] == 0 and mass["largest_solid_ml"] == pytest.approx(0.288)
    assert mass["in_nodules_percent"] == pytest.approx(24.0) and mass["median_hu"] == -500
    assert (patch["rank"], patch["ml"], patch["first_slice"], patch["last_slice"]) == (2, pytest.approx(0.1), 10, 11)
    assert patch["aerated_percent"] == pytest.approx(2.0) and patch["largest_solid_ml"] == 0
    assert patch["in_nodules_percent"] == 0


def test_small_components_are_left_out_and_nodules_are_optional():
    labels, ct = scan()
    (mass,) = infection_components(labels, ct, SPACING, min_ml=0.5)
    assert mass["ml"] == pytest.approx(1.2) and mass["in_nodules_percent"] == ""
    assert infection_components(np.ones_like(labels), ct, SPACING) == []


def test_any_mask_gives_the_same_rows():
    labels, ct = scan()
    assert mask_components(labels == 3, ct, SPACING) == infection_components(labels, ct, SPACING)
    gas = np.zeros(labels.shape, dtype=bool)
    gas[0:2, 0:10, 0:10] = True  # 200 voxels of lung at -850 HU, e.g. stomach gas called lung
    (pocket,) = mask_components(gas, ct, SPACING)
    assert pocket["ml"] == pytest.approx(0.4) and pocket["aerated_percent"] == 100 and pocket["median_hu"] == -850
    assert (pocket["first_slice"], pocket["last_slice"], pocket["largest_solid_ml"]) == (0, 1, 0)


def test_grids_must_match():
    labels, ct = scan()
    with pytest.raises(ValueError, match="one grid"):
        infection_components(labels, ct[1:], SPACING)
    with pytest.raises(ValueError, match="one grid"):
        infection_components(labels, ct, SPACING, np.zeros((2, 2, 2), dtype=bool))


def test_csv_and_markdown():
    labels, ct = scan()
    rows = infection_components(labels, ct, SPACING)
    parsed = list(csv.DictReader(io.StringIO(components_csv(rows))))
    assert [(r["rank"], r["ml"], r["in_nodules_percent"]) for r in parsed] == [("1", "1.2", ""), ("2", "0.1", "")]
    lines = components_markdown({"chest": rows}, most=1)
    assert lines[2] == "| chest | 1 of 2 | 1.2 | 2-7 | -500 | 24 / 76 / 0 | 0.3 | - |" and len(lines) == 3
