"""A synthetic whole chest in HU for the classical lung mask and the negative slices: room air around
a body, two textured lungs joined to a trachea that runs up to the neck, an air-filled stomach whose
roof touches the left lung base through a diaphragm thinner than a slice, and a pocket of bowel gas.
Arrays are canonical LPS (z, y, x): z grows towards the head, the right lung has the smaller x."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from synthetic_lidc import nodule, roi, square, write_read_message

SPACING_ZYX = (2.5, 1.5, 1.5)
SHAPE = (48, 128, 128)
ORIGIN_XYZ = (-96.0, -96.0, -60.0)


@dataclass
class WholeChest:
    volume: np.ndarray
    lungs: np.ndarray
    trachea: np.ndarray
    stomach: np.ndarray
    bowel: np.ndarray


def whole_chest(seed: int = 0) -> WholeChest:
    rng = np.random.default_rng(seed)
    depth, rows, cols = SHAPE
    z, y, x = np.ogrid[:depth, :rows, :cols]
    volume = np.full(SHAPE, -1000.0, dtype=np.float32) + rng.normal(0, 8, SHAPE)
    body = ((y - 64) / 50.0) ** 2 + ((x - 64) / 60.0) ** 2 <= 1
    volume[np.broadcast_to(body, SHAPE)] = 40.0
    spine = ((y - 100) / 8.0) ** 2 + ((x - 64) / 8.0) ** 2 <= 1
    volume[np.broadcast_to(spine, SHAPE)] = 700.0
    lungs = np.zeros(SHAPE, dtype=bool)
    for centre_x in (38, 90):
        lungs |= ((y - 62) / 30.0) ** 2 + ((x - centre_x) / 20.0) ** 2 + ((z - 26) / 16.0) ** 2 <= 1
    # Lung parenchyma: -860 HU with noise and a few vessels.
    volume[lungs] = -860.0 + rng.normal(0, 25, lungs.sum())
    vessels = lungs & (rng.random(SHAPE) < 0.01)
    volume[vessels] = 0.0
    trachea = (((y - 50) / 5.0) ** 2 + ((x - 64) / 5.0) ** 2 <= 1) & (z >= 30)
    bronchi = np.zeros(SHAPE, dtype=bool)
    for side_x in (38, 90):  # main bronchi from the carina (z 30) out to each lung
        for step in np.linspace(0, 1, 40):
            cx, cz = 64 + (side_x - 64) * step * 0.6, 30 - 3 * step
            bronchi |= ((y - 52) / 3.0) ** 2 + ((x - cx) / 3.0) ** 2 + ((z - cz) / 1.2) ** 2 <= 1
    airway = (trachea | bronchi) & np.broadcast_to(body, SHAPE)
    volume[airway] = -1000.0 + rng.normal(0, 8, airway.sum())
    stomach = ((y - 62) / 18.0) ** 2 + ((x - 92) / 16.0) ** 2 + ((z - 3.5) / 6.0) ** 2 <= 1
    stomach &= ~lungs
    volume[stomach] = -990.0 + rng.normal(0, 8, stomach.sum())
    # The diaphragm between the stomach's roof and the lung base: one slice of -400 HU partial volume.
    roof = np.zeros(SHAPE, dtype=bool)
    roof[10] = stomach[9] & lungs[11]
    volume[roof] = -400.0
    bowel = ((y - 70) / 6.0) ** 2 + ((x - 40) / 6.0) ** 2 + ((z - 3) / 2.0) ** 2 <= 1
    volume[bowel] = -995.0 + rng.normal(0, 8, bowel.sum())
    return WholeChest(volume, lungs & ~airway, trachea & np.broadcast_to(body, SHAPE), stomach, bowel)


def chest_image(seed: int = 0, origin_xyz: tuple[float, float, float] = ORIGIN_XYZ) -> sitk.Image:
    """The whole chest of ``seed`` as an int16 image in HU at ``SPACING_ZYX``, canonical axes."""
    image = sitk.GetImageFromArray(whole_chest(seed).volume.astype(np.int16))
    image.SetSpacing(SPACING_ZYX[::-1])
    image.SetOrigin(origin_xyz)
    return image


def write_nodule_read(path: Path, origin_xyz: tuple[float, float, float] = ORIGIN_XYZ) -> Path:
    """An LIDC read message outlining 7 x 7 pixels of the right lung on slice 26, the lungs' middle, of
    :func:`chest_image` at ``origin_xyz``."""
    z_mm = origin_xyz[2] + SPACING_ZYX[0] * 26
    return write_read_message(path, [[nodule("N", [roi(z_mm, square(34, 58, 40, 64))])]])
