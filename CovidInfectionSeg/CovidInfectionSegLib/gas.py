"""Pockets of pure gas in a CT in HU: the trachea, gas in the stomach and bowel, room air.

Aerated lung is tissue and air mixed: smoothed over a few millimetres it stays 50 HU or more above
what pure air reads on the scanner. Gas in the stomach or bowel, and the trachea, are pure air. The
post-processing uses this to take an air-filled stomach or colon out of the lungs (the network can
call them lung), and the training's classical lung mask uses it the same way.

Arrays are (z, y, x); spacing is (z, y, x) in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GAS_MARGIN_HU = 45.0
GAS_SMOOTHING_MM = 2.0
GAS_REGROW_MM = 15.0
MIN_GAS_POCKET_ML = 2.0
PADDING_BELOW_HU = -1500.0  # scanners pad outside the field of view with -2048 or -3024


def air_level_hu(volume_hu: np.ndarray) -> float:
    """What air reads on this scanner: the median of the voxels between -1500 and -900 HU (mostly the
    room air around the body). Scanners are calibrated to -1000 HU but read -960 to -1010."""
    air = volume_hu[(volume_hu > PADDING_BELOW_HU) & (volume_hu < -900)]
    return float(np.median(air)) if air.size else -1000.0


def pure_gas(volume_hu: np.ndarray, spacing_zyx: np.ndarray, air_hu: float | None = None) -> np.ndarray:
    """Voxels of pure gas: within GAS_MARGIN_HU of air when smoothed in-plane over GAS_SMOOTHING_MM, in
    3D pockets of at least MIN_GAS_POCKET_ML. ``air_hu`` defaults to :func:`air_level_hu` of the volume."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    threshold = (air_level_hu(volume_hu) if air_hu is None else air_hu) + GAS_MARGIN_HU
    sigma = GAS_SMOOTHING_MM / spacing[1:]
    gas = np.zeros(volume_hu.shape, dtype=bool)
    for z in range(volume_hu.shape[0]):
        gas[z] = ndimage.gaussian_filter(volume_hu[z].astype(np.float32), sigma) < threshold
    labels, count = ndimage.label(gas)
    if not count:
        return gas
    volumes = np.bincount(labels.ravel(), minlength=count + 1) * (float(np.prod(spacing)) / 1000.0)
    volumes[0] = 0
    pockets = (volumes >= MIN_GAS_POCKET_ML)[labels]
    # Smoothing lifts the gas next to fluid or a wall above the threshold (the corners of an air-fluid
    # level): grow the pockets back into voxels that are gas themselves. Noise in aerated lung makes
    # only scattered such voxels, too sparse to carry the growth far.
    return dilate_in_plane(pockets, spacing, GAS_REGROW_MM, within=volume_hu < threshold)


def disk(spacing_zyx: np.ndarray, mm: float) -> np.ndarray:
    """A (1, rows, cols) disk of radius ``mm`` on the in-plane grid."""
    radius = np.maximum(1, np.round(mm / np.asarray(spacing_zyx, dtype=float)[1:]).astype(int))
    yy, xx = np.ogrid[-radius[0] : radius[0] + 1, -radius[1] : radius[1] + 1]
    return ((yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0)[None]


def dilate_in_plane(mask: np.ndarray, spacing_zyx: np.ndarray, mm: float, within: np.ndarray | None = None) -> np.ndarray:
    """Dilate each slice by ``mm`` (a disk); with ``within``, geodesically: step by step, never leaving it."""
    if within is not None:
        steps = max(1, int(round(mm / min(np.asarray(spacing_zyx, dtype=float)[1:]))))
        cross = np.zeros((3, 3, 3), dtype=bool)
        cross[1] = ndimage.generate_binary_structure(2, 1)
        return ndimage.binary_dilation(mask, structure=cross, iterations=steps, mask=within)
    return ndimage.binary_dilation(mask, structure=disk(spacing_zyx, mm))
