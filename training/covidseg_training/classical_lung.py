"""A classical lung mask from Hounsfield units: the reference for healthy whole scans.

Used twice: as the lung label of negative training slices (scans with no COVID-19 and no expert
masks) and as the reference of the whole-scan checks (model lung outside it, lung it misses). It is
the textbook threshold-and-components method with two additions for what the shared scans showed
(an air-filled stomach touching the lung base, a trachea joined to the lungs or not pure gas), so it is only
trusted on aerated lungs:

1. air is below ``AIR_HU`` (-320 HU); air connected to a slice's border is outside the body (room
   air, the table, the padding outside the field of view);
2. pure gas is found on the smoothed image, relative to what room air reads on this scanner: the
   trachea and main bronchi, gas in the stomach and bowel. These pockets and their walls are cut
   out, which separates a stomach from a lung base that it touches through a diaphragm thinner than
   a slice;
3. of the remaining air, the lungs are the 3D components of aerated tissue (median above -950 HU)
   that reach above the middle of the largest one (nothing below the diaphragm does);
4. lung cut away with the pockets' walls is given back (geodesic dilation that does not enter gas),
   then vessels at the lung edge are closed and holes up to ``MAX_HOLE_CM2`` filled per slice:
   vessels and nodules, but not the dome of the liver or spleen seen as an island in the lung base,
   nor the mediastinum where the two lungs touch in front and behind it;
5. a trachea that step 2 missed (on 5 mm slices of a sharp kernel it reads -930 HU, not pure gas) is
   taken out before the closing of step 4: the small, round pieces of a slice's mask near the lungs'
   midline that stack into a tube at least ``AIRWAY_MIN_MM`` long, bridged over the few slices where
   it touches a lung. Lung tips at the apex lie to the side, not on the midline.

Arrays are (z, y, x) in the engine's canonical LPS orientation (z grows towards the head); spacing is
(z, y, x) in mm.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from CovidInfectionSegLib.gas import dilate_in_plane, disk, pure_gas

AIR_HU = -320.0
GAS_MEDIAN_HU = -950.0  # gas in the stomach or bowel is nearly pure air; aerated lung is denser
MIN_LUNG_ML = 20.0
MIN_FRACTION = 0.01
GAS_WALL_MM = 4.0
SLIVER_MM = 2.5
CLOSING_MM = 3.0
# Holes in a slice's lung mask on the shared scans: vessels and nodules up to 4.4 cm2; the liver or
# spleen dome inside the lung base 6.7-57 cm2; the mediastinum between touching lungs 50 cm2.
MAX_HOLE_CM2 = 5.0
# The trachea on the shared scans: 0.8-4.5 cm2 a slice, its centre 12 mm or less from the midpoint of
# the lungs' left-right extent. The apical lung tips lie 25-50 mm from that midpoint, and
# none stays under 6 cm2 for 10 mm.
AIRWAY_MAX_CM2 = 6.0
AIRWAY_MIDLINE_MM = 25.0
AIRWAY_MIN_MM = 10.0
AIRWAY_GAP_MM = 15.0


def classical_lung_mask(volume_hu: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Boolean (z, y, x) lung mask of a CT in HU; empty where the scan holds no lung."""
    spacing = np.asarray(spacing_zyx, dtype=float)
    inside = inside_body_air(volume_hu)
    gas = pure_gas(volume_hu, spacing)
    pockets = dilate_in_plane(gas, spacing, GAS_WALL_MM)
    # Opening drops the slivers of partial volume that line a gas pocket's wall.
    labels, _ = ndimage.label(_open_in_plane(inside & ~pockets, spacing, SLIVER_MM))
    lungs = lung_components(labels, volume_hu, spacing)
    if not lungs.any():
        return lungs
    # Give back the lung that the pockets' walls took, without crossing into the gas itself.
    lungs = dilate_in_plane(lungs, spacing, GAS_WALL_MM, within=inside & ~gas)
    # The trachea goes before the vessels' closing, which would bridge it to a lung a few mm away.
    trachea = trachea_pieces(lungs, spacing)
    return fill_vessels(lungs & ~trachea, spacing) & ~trachea


def _open_in_plane(mask: np.ndarray, spacing: np.ndarray, mm: float) -> np.ndarray:
    return ndimage.binary_opening(mask, structure=disk(spacing, mm))


def inside_body_air(volume_hu: np.ndarray, air_hu: float = AIR_HU) -> np.ndarray:
    """Voxels below ``air_hu`` that are not connected, within their slice, to the slice's border."""
    air = volume_hu < air_hu
    outside = np.zeros_like(air)
    for z in range(air.shape[0]):
        labels, count = ndimage.label(air[z])
        if not count:
            continue
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside[z] = np.isin(labels, border[border > 0])
    return air & ~outside


def lung_components(
    labels: np.ndarray, volume_hu: np.ndarray, spacing: np.ndarray,
    min_ml: float = MIN_LUNG_ML, min_fraction: float = MIN_FRACTION,
) -> np.ndarray:
    """The components of ``labels`` that are lung: aerated tissue (median above GAS_MEDIAN_HU), at
    least ``min_ml`` and ``min_fraction`` of the largest such component, and reaching above the middle
    of that largest one (gas and air below the diaphragm does not)."""
    count = int(labels.max())
    if not count:
        return np.zeros(labels.shape, dtype=bool)
    index = np.arange(1, count + 1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = ndimage.sum_labels(np.ones(labels.shape, dtype=np.uint8), labels, index) * voxel_ml
    medians = ndimage.median(volume_hu, labels, index)
    aerated = (volumes >= min_ml) & (np.asarray(medians) > GAS_MEDIAN_HU)
    if not aerated.any():
        return np.zeros(labels.shape, dtype=bool)
    largest = index[aerated][np.argmax(volumes[aerated])]
    z = np.arange(labels.shape[0])[:, None, None]
    middle = ndimage.mean(np.broadcast_to(z, labels.shape), labels, largest)
    tops = np.asarray(ndimage.maximum(np.broadcast_to(z, labels.shape), labels, index))
    keep = index[aerated & (volumes >= min_fraction * volumes[largest - 1]) & (tops >= middle)]
    return np.isin(labels, keep)


def fill_vessels(lungs: np.ndarray, spacing: np.ndarray, closing_mm: float = CLOSING_MM,
                 max_hole_cm2: float = MAX_HOLE_CM2) -> np.ndarray:
    """Close by ``closing_mm`` in-plane (vessels at the lung edge) and fill holes of up to
    ``max_hole_cm2`` slice by slice."""
    radius = np.maximum(1, np.round(closing_mm / spacing[1:]).astype(int))
    yy, xx = np.ogrid[-radius[0] : radius[0] + 1, -radius[1] : radius[1] + 1]
    disk = (yy / radius[0]) ** 2 + (xx / radius[1]) ** 2 <= 1.0
    max_hole_pixels = max_hole_cm2 * 100.0 / float(spacing[1] * spacing[2])
    out = np.zeros_like(lungs)
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        closed = ndimage.binary_closing(lungs[z], structure=disk, border_value=0) | lungs[z]
        holes, count = ndimage.label(ndimage.binary_fill_holes(closed) & ~closed)
        small = np.bincount(holes.ravel(), minlength=count + 1) <= max_hole_pixels
        small[0] = False
        out[z] = closed | small[holes]
    return out


def trachea_pieces(lungs: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """The pieces of ``lungs`` that are a trachea: per slice, components of at most ``AIRWAY_MAX_CM2``,
    no more than twice as long as wide, centred within ``AIRWAY_MIDLINE_MM`` of the midpoint of the
    lungs' left-right extent, that stack in 3D into a tube at least ``AIRWAY_MIN_MM`` long. Where the
    tube touches a lung within a slice for up to ``AIRWAY_GAP_MM``, the mask within 2 mm of its pieces
    in the slices above and below is the trachea there."""
    columns = np.flatnonzero(lungs.any(axis=(0, 1)))
    if not len(columns):
        return np.zeros_like(lungs)
    midline_mm = (columns[0] + columns[-1]) / 2 * spacing[2]
    pixel_cm2 = float(spacing[1] * spacing[2]) / 100.0
    candidates = np.zeros_like(lungs)
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        labels, _ = ndimage.label(lungs[z])
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            piece = labels[box] == index
            height_mm = (box[0].stop - box[0].start) * spacing[1]
            width_mm = (box[1].stop - box[1].start) * spacing[2]
            centre_mm = (box[1].start + box[1].stop) / 2 * spacing[2]
            if (piece.sum() * pixel_cm2 <= AIRWAY_MAX_CM2 and max(height_mm, width_mm) <= 2 * min(height_mm, width_mm)
                    and abs(centre_mm - midline_mm) <= AIRWAY_MIDLINE_MM):
                candidates[z][box] |= piece
    tubes, _ = ndimage.label(candidates)
    out = np.zeros_like(lungs)
    for index, box in enumerate(ndimage.find_objects(tubes), start=1):
        if (box[0].stop - box[0].start) * spacing[0] >= AIRWAY_MIN_MM:
            out[box] |= tubes[box] == index
    with_tube = np.flatnonzero(out.any(axis=(1, 2)))
    for lower, upper in zip(with_tube[:-1], with_tube[1:]):
        if 1 < upper - lower and (upper - lower - 1) * spacing[0] <= AIRWAY_GAP_MM:
            footprint = dilate_in_plane((out[lower] | out[upper])[None], spacing, 2.0)
            out[lower + 1 : upper] |= lungs[lower + 1 : upper] & footprint
    return out


def distance_outside_mm(mask: np.ndarray, reference: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """For each voxel of ``mask``, its distance in mm to the nearest voxel of ``reference`` (0 inside)."""
    if not reference.any():
        return np.where(mask, np.inf, 0.0)
    distance = ndimage.distance_transform_edt(~reference, sampling=spacing_zyx)
    return np.where(mask, distance, 0.0)
