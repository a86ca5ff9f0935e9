"""Volumes, percentages and severity grades against hand-computed values; CSV and JSON files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from CovidInfectionSegLib.measurements import (
    GRADE_NAMES,
    Measurements,
    RegionMeasurement,
    measure,
    severity_grade,
    voxel_volume_ml,
)


@pytest.mark.parametrize(
    "percent, grade",
    [
        (0.0, 0),
        (0.001, 1),
        (4.99, 1),
        (5.0, 2),
        (24.99, 2),
        (25.0, 3),
        (49.99, 3),
        (50.0, 4),
        (74.99, 4),
        (75.0, 5),
        (100.0, 5),
    ],
)
def test_grade_bands(percent: float, grade: int) -> None:
    assert severity_grade(percent) == grade


def test_grade_names() -> None:
    assert GRADE_NAMES == ("none", "minimal", "mild", "moderate", "severe", "critical")


def make_maps() -> tuple[np.ndarray, np.ndarray]:
    """Right lung 1000 voxels with 100 infected; left lung 500 voxels with 300 infected; stray infection outside."""
    side = np.zeros((10, 20, 20), dtype=np.uint8)
    infection = np.zeros(side.shape, dtype=bool)
    side[:, :10, :10] = 1  # 10 * 10 * 10 = 1000
    side[:5, :10, 10:20] = 2  # 5 * 10 * 10 = 500
    infection[:1, :10, :10] = True  # 100 in the right lung
    infection[:3, :10, 10:20] = True  # 300 in the left lung
    infection[:, 15:, :] = True  # outside both lungs: not counted
    return side, infection


def test_measure_against_hand_computed_volumes() -> None:
    side, infection = make_maps()
    spacing = (0.5, 0.8, 2.5)  # 1 mm3 per voxel = 0.001 mL
    assert voxel_volume_ml(spacing) == pytest.approx(0.001)
    result = measure(side, infection, spacing)
    assert result.right_lung.lung_ml == pytest.approx(1.0)
    assert result.right_lung.infection_ml == pytest.approx(0.1)
    assert result.right_lung.percent_infected == pytest.approx(10.0)
    assert result.right_lung.grade == 2
    assert result.left_lung.lung_ml == pytest.approx(0.5)
    assert result.left_lung.infection_ml == pytest.approx(0.3)
    assert result.left_lung.percent_infected == pytest.approx(60.0)
    assert result.left_lung.grade == 4
    assert result.total.lung_ml == pytest.approx(1.5)
    assert result.total.infection_ml == pytest.approx(0.4)
    assert result.total.percent_infected == pytest.approx(100 * 0.4 / 1.5)
    assert result.total.grade == 3 and result.total.grade_name == "moderate"


def test_no_lung_means_zero_percent() -> None:
    region = RegionMeasurement(lung_ml=0.0, infection_ml=0.0)
    assert region.percent_infected == 0.0 and region.grade == 0 and region.grade_name == "none"


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        measure(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), bool), (1, 1, 1))


def test_dict_csv_and_json(tmp_path: Path) -> None:
    result = Measurements(RegionMeasurement(2000.0, 100.0), RegionMeasurement(1500.0, 0.0))
    data = result.to_dict()
    assert data["right_lung"] == {
        "lung_ml": 2000.0,
        "infection_ml": 100.0,
        "percent_infected": 5.0,
        "grade": 2,
        "grade_name": "mild",
    }
    assert data["total"]["percent_infected"] == pytest.approx(100 * 100 / 3500, abs=1e-3)
    assert data["total"]["grade"] == 1
    assert "Pan et al. 2020" in data["grading"]

    result.write_csv(tmp_path / "m.csv")
    rows = list(csv.DictReader((tmp_path / "m.csv").open()))
    assert [row["region"] for row in rows] == ["right_lung", "left_lung", "total"]
    assert rows[1] == {
        "region": "left_lung",
        "lung_ml": "1500.0",
        "infection_ml": "0.0",
        "percent_infected": "0.0",
        "grade": "0",
        "grade_name": "none",
    }

    result.write_json(tmp_path / "m.json")
    loaded = json.loads((tmp_path / "m.json").read_text(encoding="utf-8"))
    assert loaded == json.loads(json.dumps(data))
    assert Measurements.from_dict(loaded) == result
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.csv", "m.json"]  # no temporary files left
