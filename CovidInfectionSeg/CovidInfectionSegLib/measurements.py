"""Lung and infection volumes, percent of lung infected and a severity grade, per lung and in total.

Severity grade (CT severity score bands of Pan et al., Radiology 2020, and Chung et al., Radiology
2020, applied to the percentage of lung volume infected rather than visually per lobe):

    0 none      0 %          3 moderate  25 - <50 %
    1 minimal   >0 - <5 %    4 severe    50 - <75 %
    2 mild      5 - <25 %    5 critical  >= 75 %

Lung volumes include the infection inside that lung (the labelmap's lung segments do not).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text_atomic
from .slabs import slabs

GRADE_NAMES = ("none", "minimal", "mild", "moderate", "severe", "critical")
# Lower bound (percent infected) of grades 2..5; grade 1 is anything above 0 below the first bound.
GRADE_LOWER_BOUNDS = (5.0, 25.0, 50.0, 75.0)
GRADE_DESCRIPTION = (
    "0 none (0%), 1 minimal (<5%), 2 mild (5-25%), 3 moderate (25-50%), 4 severe (50-75%), "
    "5 critical (>=75%) of lung volume infected (CT severity score bands, Pan et al. 2020 / Chung et al. 2020)"
)
REGIONS = ("right_lung", "left_lung", "total")
CSV_FIELDS = ("region", "lung_ml", "infection_ml", "percent_infected", "grade", "grade_name")


def severity_grade(percent_infected: float) -> int:
    """The 0..5 severity grade for a percentage of lung volume infected (see module docstring)."""
    if percent_infected <= 0.0:
        return 0
    return 1 + sum(percent_infected >= bound for bound in GRADE_LOWER_BOUNDS)


@dataclass(frozen=True)
class RegionMeasurement:
    """Volumes of one lung (or both): ``lung_ml`` includes ``infection_ml``."""

    lung_ml: float
    infection_ml: float

    @property
    def percent_infected(self) -> float:
        return 100.0 * self.infection_ml / self.lung_ml if self.lung_ml > 0 else 0.0

    @property
    def grade(self) -> int:
        return severity_grade(self.percent_infected)

    @property
    def grade_name(self) -> str:
        return GRADE_NAMES[self.grade]

    def to_dict(self) -> dict[str, Any]:
        return {
            "lung_ml": round(self.lung_ml, 3),
            "infection_ml": round(self.infection_ml, 3),
            "percent_infected": round(self.percent_infected, 3),
            "grade": self.grade,
            "grade_name": self.grade_name,
        }


@dataclass(frozen=True)
class Measurements:
    """Right lung, left lung and total measurements of one segmentation."""

    right_lung: RegionMeasurement
    left_lung: RegionMeasurement

    @property
    def total(self) -> RegionMeasurement:
        return RegionMeasurement(
            lung_ml=self.right_lung.lung_ml + self.left_lung.lung_ml,
            infection_ml=self.right_lung.infection_ml + self.left_lung.infection_ml,
        )

    def region(self, name: str) -> RegionMeasurement:
        """``"right_lung"``, ``"left_lung"`` or ``"total"``."""
        if name not in REGIONS:
            raise KeyError(f"unknown region {name!r}; use one of {REGIONS}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """Nested dictionary: one entry per region, plus the grading scheme."""
        return {**{name: self.region(name).to_dict() for name in REGIONS}, "grading": GRADE_DESCRIPTION}

    def to_csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for name in REGIONS:
            writer.writerow({"region": name, **self.region(name).to_dict()})
        return buffer.getvalue()

    def write_csv(self, path: str | Path) -> None:
        """One row per region (right_lung, left_lung, total); written atomically."""
        write_text_atomic(path, self.to_csv_text())

    def write_json(self, path: str | Path) -> None:
        """:meth:`to_dict` as JSON; written atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Measurements":
        """Inverse of :meth:`to_dict` (derived fields are recomputed)."""
        return cls(
            right_lung=RegionMeasurement(
                float(data["right_lung"]["lung_ml"]), float(data["right_lung"]["infection_ml"])
            ),
            left_lung=RegionMeasurement(float(data["left_lung"]["lung_ml"]), float(data["left_lung"]["infection_ml"])),
        )


def voxel_volume_ml(spacing_mm: tuple[float, ...]) -> float:
    """Volume of one voxel in millilitres (1 mL = 1000 mm3)."""
    return float(np.prod(spacing_mm)) / 1000.0


def measure(side: np.ndarray, infection: np.ndarray, spacing_mm: tuple[float, ...]) -> Measurements:
    """Measure from a side map (1 right lung, 2 left lung, including infected voxels) and an infection mask.

    ``side`` and ``infection`` have the same shape; infection voxels outside both lungs are not counted.
    """
    if side.shape != infection.shape:
        raise ValueError(f"side map {side.shape} and infection mask {infection.shape} differ in shape")
    voxel_ml = voxel_volume_ml(spacing_mm)
    lung_voxels = {1: 0, 2: 0}
    infected_voxels = {1: 0, 2: 0}
    for slab in slabs(side.shape):  # no full-size temporaries
        slab_infection = infection[slab].astype(bool, copy=False)
        for value in lung_voxels:
            in_lung = side[slab] == value
            lung_voxels[value] += int(np.count_nonzero(in_lung))
            infected_voxels[value] += int(np.count_nonzero(in_lung & slab_infection))
    return Measurements(**{
        name: RegionMeasurement(lung_ml=lung_voxels[value] * voxel_ml, infection_ml=infected_voxels[value] * voxel_ml)
        for name, value in (("right_lung", 1), ("left_lung", 2))
    })
