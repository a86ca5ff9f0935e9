"""Synthetic chest CT phantoms in HU with known lungs and infection, for engine tests.

The body (soft tissue, 40 HU) fills the field of view, like a CT reconstructed inside the body, and the
lungs are air-filled ellipsoids (-850 HU). The tiny ThresholdNet test model calls them lung exactly.
Arrays are canonical LPS (z, y, x): the right lung has the smaller x index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

BODY_HU = 40.0
LUNG_HU = -850.0
# The tiny model calls only near-maximum intensities infection; metal-bright blobs play that role.
INFECTION_HU = 2000.0
# A spine keeps the per-slice maximum away from soft tissue (the recipe is a per-slice min-max).
SPINE_HU = 1000.0


@dataclass
class Phantom:
    volume: np.ndarray  # (z, y, x) HU, canonical LPS
    right_lung: np.ndarray  # bool, includes infection in that lung
    left_lung: np.ndarray
    infection: np.ndarray
    spacing: tuple[float, float, float]  # x, y, z mm

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def image(self, direction: tuple[float, ...] | None = None, origin=(-150.0, -120.0, -60.0)) -> sitk.Image:
        """The phantom as an LPS-ordered SimpleITK image (direction defaults to identity)."""
        image = sitk.GetImageFromArray(self.volume.astype(np.int16))
        image.SetSpacing(self.spacing)
        image.SetOrigin(origin)
        if direction is not None:
            image.SetDirection(direction)
        return image


def chest_phantom(
    shape: tuple[int, int, int] = (16, 64, 64),
    spacing: tuple[float, float, float] = (5.0, 5.0, 10.0),
    infection_in_right: bool = False,
) -> Phantom:
    """Two lung ellipsoids either side of the midline; optionally a bright 'infection' blob in the right lung."""
    depth, rows, cols = shape
    z, y, x = np.ogrid[:depth, :rows, :cols]
    volume = np.full(shape, BODY_HU, dtype=np.float32)
    spine = ((y - rows * 0.85) / (rows * 0.07)) ** 2 + ((x - (cols - 1) / 2) / (cols * 0.07)) ** 2 <= 1
    volume[:, spine[0]] = SPINE_HU
    lungs = []
    for centre_x in (cols * 0.28, cols * 0.72):
        lung = (
            ((y - rows * 0.47) / (rows * 0.25)) ** 2
            + ((x - centre_x) / (cols * 0.16)) ** 2
            + ((z - (depth - 1) / 2) / (depth * 0.56)) ** 2
        ) <= 1
        volume[lung] = LUNG_HU
        lungs.append(lung)
    infection = np.zeros(shape, dtype=bool)
    if infection_in_right:
        infection = (
            ((y - rows * 0.47) / (rows * 0.1)) ** 2
            + ((x - cols * 0.28) / (cols * 0.07)) ** 2
            + ((z - (depth - 1) / 2) / (depth * 0.2)) ** 2
        ) <= 1
        volume[infection] = INFECTION_HU
    return Phantom(volume, lungs[0], lungs[1], infection, spacing)


def lung_and_infection_net():
    """A ThresholdNet for phantoms: dark (< 0.3) is lung, bright (> 0.75) infection."""
    from model_factory import ThresholdNet

    return ThresholdNet(lung_below=0.3, infection_above=0.75)
