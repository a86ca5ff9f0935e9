"""Turn the network's per-slice classes (0 background, 1 lung, 2 infection) into a clean 3D labelmap:
1 Right lung, 2 Left lung, 3 Infection (non-overlapping).

All arrays are canonical LPS (z, y, x): x grows toward the patient's left, so the right lung has the
smaller x. Every size threshold is physical (mm, mm3, mL) and converted with the voxel spacing, so
results do not depend on resolution. Steps:

0. for CT in HU, pockets of gas that the network called lung but that lung does not surround (an
   air-filled stomach or colon, room air trapped by the table or a blanket) are taken out with a
   3 mm wall (:func:`drop_gas_pockets`). Measured on the bundled v1 model's output for the shared real
   scans: the stomach in covid-chest-ct's 17 lowest slices 244 -> 10 mL, the abdominal NIfTI's colon
   gas 251 -> 113 mL of "lung", the healthy chest CT (both kernels) and LIDC-IDRI-0001 unchanged.
   With a dropped pocket goes its rim: pieces of "lung" that in their axial slice lie wholly within
   ``GAS_RING_MM`` of the pocket and ``GAS_WALL_MM`` of tissue (:func:`drop_pocket_rims`; the strip
   along a stomach's air-fluid level, 8.2 -> 2.4 mL in covid-chest-ct's 17 lowest slices for a
   60-epoch fold-2 model; nothing on the other shared scans).
   Then dense tissue that the network called lung, more than ``DENSE_CORE_MM`` from any aerated
   voxel and with hardly any aerated lung around it (a contrast-filled stomach or bowel, the liver
   dome), is taken out too (:func:`drop_dense_false_lung`); infection is left to steps 4 and 5.
1. lung components: in each axial slice, lung voxels connected to the image border are air outside
   the body and are removed (a lung cut by a field of view smaller than the body loses those slices);
   then 3D components of (lung | infection): drop those under ``min_lung_component_ml`` and, for CT
   in HU, those that are not air-filled (median HU of their lung voxels above ``max_lung_median_hu``:
   bowel, soft tissue) and a second component under ``SMALL_SECOND_COMPONENT`` of the first that is not
   wrapped in tissue (over ``max_light_shell_fraction`` of its in-plane one-voxel shell lighter than
   ``AERATED_HU``: a lung is wrapped in chest wall, mediastinum and diaphragm; room air or a foam
   cushion between the back and the table is not), and any component after the largest that lies
   mostly (over ``max_outside_air_share`` of its voxels) in air outside the body: air lighter than
   ``AERATED_HU`` that reaches the image border within its axial slice (a cushion under the neck that
   the network called lung, of any size; a lung, collapsed or not, is walled in by the chest in every
   slice); keep at most the two largest.
2. left/right: a component lying on one side of the body midline goes to that side; one straddling it
   (touching lungs, or lungs joined by the trachea) is cut per slice within ``midline_search_mm`` of the
   midline: at an empty column between the lungs, else at the column with the fewest lung voxels that
   still has a fair share of the slice's lung on both sides.
3. holes filled per lung, per axial slice (which leaves no 3D hole).
4. infection kept only inside the lungs dilated by ``infection_margin_mm``; infection components
   under ``min_infection_mm3`` are removed (inside the lungs they become lung).
5. for CT in HU, infection components with almost no aerated lung around them (less than
   ``min_aerated_shell_fraction`` of the one-voxel shell around the component is lung below
   ``AERATED_HU``) are removed and do not become lung: real lesions border breathing lung on at
   least part of their surface, while the model's false calls in fat or bowel wall below the
   diaphragm border none (measured on the real abdominal CT in shared data: 30 of 39 mL removed,
   while every infection component in the real chest CT had at least 39% aerated shell).
6. for CT in HU, small solid infection components are nodules and become lung of their side
   (:func:`solid_nodules`): at most ``MAX_NODULE_ML`` (a 30 mm ball; a nodule is at most 3 cm across)
   with at least ``MIN_NODULE_SOLID_SHARE`` of their voxels above ``SOLID_HU``. COVID-19 pneumonia is
   ground glass first and consolidation in large confluent areas later; discrete small solid nodules
   are an atypical appearance (RSNA consensus, 2020). Measured with and without: model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from .gas import GAS_MARGIN_HU, GAS_SMOOTHING_MM, air_level_hu
from .slabs import slabs

RIGHT_LUNG = 1
LEFT_LUNG = 2
INFECTION = 3

MIN_LUNG_COMPONENT_ML = 20.0
MAX_LUNG_MEDIAN_HU = -300.0
INFECTION_MARGIN_MM = 3.0
MIN_INFECTION_MM3 = 50.0
MIDLINE_SEARCH_MM = 40.0
STRADDLE_FRACTION = 0.1
CUT_MIN_SIDE_FRACTION = 0.15
BODY_MIN_HU = -500.0
MIDLINE_SAMPLE_SLICES = 32
AERATED_HU = -500.0
MIN_AERATED_SHELL_FRACTION = 0.1
MAX_GAS_POCKET_LUNG_BORDER = 0.5
MAX_LIGHT_SHELL_FRACTION = 0.5
MAX_OUTSIDE_AIR_SHARE = 0.5
SMALL_SECOND_COMPONENT = 0.1
MAX_DENSE_LUNG_BORDER = 0.1
DENSE_CORE_MM = 5.0
DENSE_RING_MM = 10.0
DENSE_GRID_MM = 3.0
MIN_GAS_POCKET_ML = 2.0
GAS_WALL_MM = 3.0
GAS_RING_MM = 8.0
SOLID_HU = -100.0
MAX_NODULE_ML = 4.0 / 3.0 * np.pi * 15.0**3 / 1000.0
MIN_NODULE_SOLID_SHARE = 0.25


@dataclass(frozen=True)
class PostprocessingSettings:
    """Physical thresholds of the post-processing (defaults are the module constants)."""

    min_lung_component_ml: float = MIN_LUNG_COMPONENT_ML
    max_lung_median_hu: float = MAX_LUNG_MEDIAN_HU
    infection_margin_mm: float = INFECTION_MARGIN_MM
    min_infection_mm3: float = MIN_INFECTION_MM3
    midline_search_mm: float = MIDLINE_SEARCH_MM
    straddle_fraction: float = STRADDLE_FRACTION
    min_aerated_shell_fraction: float = MIN_AERATED_SHELL_FRACTION
    max_gas_pocket_lung_border: float = MAX_GAS_POCKET_LUNG_BORDER  # 0 turns step 0 off
    max_pocket_rim_mm: float = GAS_RING_MM  # 0 leaves the dropped gas pockets' rims (drop_pocket_rims)
    max_light_shell_fraction: float = MAX_LIGHT_SHELL_FRACTION  # 1 turns the check off
    max_outside_air_share: float = MAX_OUTSIDE_AIR_SHARE  # 1 turns the check off
    max_dense_lung_border: float = MAX_DENSE_LUNG_BORDER  # 0 turns the dense part of step 0 off
    max_nodule_ml: float = MAX_NODULE_ML  # 0 turns step 6 off
    min_nodule_solid_share: float = MIN_NODULE_SOLID_SHARE


# The anatomy checks off (gas pockets, dense false lung, wrapped in tissue, outside air): the rest of the
# post-processing as it was before them, to measure what they do (`wholescan --no-anatomy-checks`).
WITHOUT_ANATOMY_CHECKS = PostprocessingSettings(
    max_gas_pocket_lung_border=0.0, max_dense_lung_border=0.0, max_light_shell_fraction=1.0, max_outside_air_share=1.0,
)
# Step 6 off, to measure what the nodule check does (`wholescan --no-nodule-check`).
WITHOUT_NODULE_CHECK = PostprocessingSettings(max_nodule_ml=0.0)


@dataclass
class LungSegmentation:
    """Post-processed result on the canonical grid.

    ``labels``: 0 background, 1 right lung, 2 left lung, 3 infection. ``region``: a box of the grid that
    holds every lung and infection voxel, and ``region_side`` the side map inside it: 1 right, 2 left for
    every lung voxel including infected ones (for per-lung measurements; outside the box there is none,
    so measuring inside it is measuring the whole grid). ``notes``: what was dropped or changed.
    """

    labels: np.ndarray
    region: tuple[slice, ...]
    region_side: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def side(self) -> np.ndarray:
        """The side map on the whole grid (a new array)."""
        side = np.zeros(self.labels.shape, dtype=np.uint8)
        side[self.region] = self.region_side
        return side

    @property
    def region_labels(self) -> np.ndarray:
        """``labels`` inside ``region`` (a view)."""
        return self.labels[self.region]


def postprocess(
    classes: np.ndarray,
    intensities: np.ndarray,
    spacing_xyz: tuple[float, float, float],
    *,
    lung_class: int = 1,
    infection_class: int = 2,
    intensities_in_hu: bool = True,
    settings: PostprocessingSettings = PostprocessingSettings(),
) -> LungSegmentation:
    """Network classes (z, y, x) + the CT (same shape, any numeric dtype) + spacing (x, y, z mm) ->
    :class:`LungSegmentation`.

    Every step works inside a box: the lung components inside the box around the network's lung and
    infection voxels, the rest inside the box around the selected lungs, padded so that nothing the
    steps can reach lies outside it. That gives the same result as the whole grid, in a fraction of the
    time and memory.
    """
    if classes.shape != intensities.shape:
        raise ValueError(f"classes {classes.shape} and intensities {intensities.shape} differ in shape")
    spacing = np.asarray(spacing_xyz, dtype=float)[::-1]  # (z, y, x) like the arrays
    notes: list[str] = []
    labels = np.zeros(classes.shape, dtype=np.uint8)
    nothing = LungSegmentation(labels, (slice(0, 0),) * classes.ndim, np.zeros((0,) * classes.ndim, np.uint8), notes)
    candidates = candidate_box(classes, lung_class, infection_class)
    if candidates is None:
        return nothing
    boxed_classes = classes[candidates]
    candidate = boxed_classes == lung_class
    candidate |= boxed_classes == infection_class
    if intensities_in_hu and settings.max_gas_pocket_lung_border > 0:
        air_hu = air_level_hu(intensities[:: max(1, len(intensities) // 32), ::4, ::4])
        drop_gas_pockets(candidate, intensities[candidates], air_hu, spacing, settings, notes)
    if intensities_in_hu and settings.max_dense_lung_border > 0:
        drop_dense_false_lung(candidate, boxed_classes == lung_class, intensities[candidates], spacing, settings, notes)
    lungs = lung_components(
        candidate, boxed_classes, lung_class, intensities[candidates], spacing, intensities_in_hu, settings, notes,
        outside_air=lambda box, mask, limit: outside_air_share(intensities, shifted_box(box, candidates), mask, limit),
    )
    del candidate
    if not lungs:
        return nothing
    lungs = [component.shifted([part.start for part in candidates]) for component in lungs]  # volume indices
    midline = body_midline_x(
        intensities,
        np.unique(np.concatenate([component.indices(0) for component in lungs])),
        np.unique(np.concatenate([component.indices(2) for component in lungs])),
        intensities_in_hu,
    )
    region = lung_region(lungs, classes.shape, lung_region_padding(spacing, settings))
    lungs = [component.shifted([-part.start for part in region]) for component in lungs]  # region indices
    region_shape = tuple(part.stop - part.start for part in region)
    region_side = split_left_right(lungs, region_shape, midline, spacing, settings, x_offset=region[2].start)
    region_labels = lungs_and_infection(
        region_side, classes[region] == infection_class, intensities[region], spacing, intensities_in_hu, settings,
        notes,
    )
    labels[region] = region_labels
    return LungSegmentation(labels=labels, region=region, region_side=region_side, notes=notes)


@dataclass(frozen=True)
class Component:
    """One 3D connected component: its bounding ``box`` in some array, and its ``mask`` inside the box."""

    box: tuple[slice, ...]
    mask: np.ndarray

    def shifted(self, offset: Sequence[int]) -> "Component":
        """The same component with its box moved by ``offset`` (into a larger or smaller array)."""
        return Component(tuple(slice(b.start + o, b.stop + o) for b, o in zip(self.box, offset)), self.mask)

    def indices(self, axis: int) -> np.ndarray:
        """The indices along ``axis`` that the component occupies."""
        other = tuple(a for a in range(self.mask.ndim) if a != axis)
        return np.flatnonzero(self.mask.any(axis=other)) + self.box[axis].start


def candidate_box(classes: np.ndarray, lung_class: int, infection_class: int) -> tuple[slice, ...] | None:
    """The box around the lung and infection voxels, one voxel wider in-plane where the image allows,
    so that a component touches the box's side exactly where it touches the image's border."""
    present = np.zeros(classes.shape[0], dtype=bool)
    footprint = np.zeros(classes.shape[1:], dtype=bool)
    for slab in slabs(classes.shape):
        candidate = classes[slab] == lung_class
        candidate |= classes[slab] == infection_class
        present[slab] = candidate.any(axis=tuple(range(1, classes.ndim)))
        footprint |= candidate.any(axis=0)
    return box_from_extents(present, footprint, pad=np.array([0, 1, 1]), shape=classes.shape)


def lung_region_padding(spacing_zyx: np.ndarray, settings: PostprocessingSettings) -> np.ndarray:
    """Margin around the lungs holding every voxel the infection steps can reach: the infection margin
    (as a voxel ellipsoid's radii) plus the one-voxel shell of :func:`unaerated_infection`."""
    return np.floor(settings.infection_margin_mm / spacing_zyx).astype(int) + 1


def lung_region(lungs: list[Component], shape: tuple[int, ...], pad: np.ndarray) -> tuple[slice, ...]:
    """The box around ``lungs``, ``pad`` wider, inside an array of ``shape``."""
    return tuple(
        slice(
            max(0, min(c.box[axis].start for c in lungs) - pad[axis]),
            min(size, max(c.box[axis].stop for c in lungs) + pad[axis]),
        )
        for axis, size in enumerate(shape)
    )


def lungs_and_infection(
    side: np.ndarray,
    infection: np.ndarray,
    intensities: np.ndarray,
    spacing_zyx: np.ndarray,
    intensities_in_hu: bool,
    settings: PostprocessingSettings,
    notes: list[str],
) -> np.ndarray:
    """Steps 3 to 6 on the lungs' side map (changed in place) and the network's infection: the labels."""
    for value in (RIGHT_LUNG, LEFT_LUNG):
        lung = side == value
        box = bounding_box(lung)
        if box is not None:  # fill_holes works in the lung's box anyway; its result there is all of it
            side[box][fill_holes(lung[box]) & (side[box] == 0)] = value
    infection = keep_infection_near_lungs(infection, side, spacing_zyx, settings)
    infection = remove_small_components(infection, settings.min_infection_mm3 / float(np.prod(spacing_zyx)))
    if intensities_in_hu:
        drop_unaerated_infection(infection, side, intensities, spacing_zyx, settings, notes)
        relabel_solid_nodules(infection, intensities, spacing_zyx, settings, notes)
    labels = side.copy()
    labels[infection] = INFECTION
    return labels


def drop_unaerated_infection(
    infection: np.ndarray,
    side: np.ndarray,
    intensities: np.ndarray,
    spacing_zyx: np.ndarray,
    settings: PostprocessingSettings,
    notes: list[str],
) -> None:
    """Step 5, in place: remove the :func:`unaerated_infection` from ``infection`` and from ``side``
    (it does not become lung), with a note of the volume."""
    if not infection.any():
        return
    unaerated = unaerated_infection(infection, side, intensities, settings.min_aerated_shell_fraction)
    if unaerated.any():
        voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
        notes.append(
            f"dropped {np.count_nonzero(unaerated) * voxel_ml:.1f} mL of infection with no aerated lung "
            f"around it (under {settings.min_aerated_shell_fraction:.0%} of its border below {AERATED_HU:g} HU)"
        )
        infection &= ~unaerated
        side[unaerated] = 0


def drop_gas_pockets(
    candidate: np.ndarray,
    intensities: np.ndarray,
    air_hu: float,
    spacing_zyx: np.ndarray,
    settings: PostprocessingSettings,
    notes: list[str],
) -> None:
    """Step 0, in place: take the pockets of gas that are not surrounded by lung out of ``candidate``.

    A pocket is a 3D component of at least ``MIN_GAS_POCKET_ML`` of candidate voxels that read as gas
    once averaged in-plane over about ``2 * GAS_SMOOTHING_MM`` (within ``GAS_MARGIN_HU`` of the
    scanner's air; aerated lung is a mix of tissue and air and stays denser). One inside the lung
    (a bulla, an airway) has aerated lung around it; gas in the stomach or colon, or room air around
    the body, has soft tissue or fluid: under ``max_gas_pocket_lung_border`` of the ring from
    ``GAS_WALL_MM`` to ``GAS_RING_MM`` around it is aerated (denser than gas, lighter than
    ``AERATED_HU``; the first millimetres are skipped, being the partial volume of the pocket's own
    edge). Such a pocket goes, with everything within ``GAS_WALL_MM`` of it, and its rim
    (:func:`drop_pocket_rims`).
    """
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    # Averaged in-plane over about 4 mm: single noise voxels of a sharp kernel's lung read as light as
    # air and would join into "pockets"; averaged, aerated lung stays well above air.
    width = np.maximum(1, np.round(2 * GAS_SMOOTHING_MM / spacing_zyx[1:]).astype(int) | 1)
    gas = np.empty(intensities.shape, dtype=bool)
    for slab in slabs(intensities.shape):  # in-plane averaging: slab by slab is the same
        smoothed = ndimage.uniform_filter(intensities[slab].astype(np.float32), size=(1, *width))
        gas[slab] = smoothed < air_hu + GAS_MARGIN_HU
    regrow = np.zeros((3, 3, 3), dtype=bool)
    regrow[1] = ndimage.generate_binary_structure(2, 1)
    pockets, large = large_components(candidate & gas, voxel_ml, np.floor(GAS_RING_MM / spacing_zyx).astype(int) + 1)
    dropped = 0
    rim_zones: list[tuple[tuple[slice, ...], np.ndarray]] = []
    for index, box in large:
        # The averaging pulled the pocket's edge in; its own gas voxels there belong to it.
        pocket = ndimage.binary_dilation(pockets[box] == index, structure=regrow, iterations=int(width.max()),
                                         mask=intensities[box] < air_hu + GAS_MARGIN_HU)
        distance = ndimage.distance_transform_edt(~pocket, sampling=spacing_zyx)
        near = distance <= GAS_WALL_MM
        ring = (distance <= GAS_RING_MM) & ~near & ~gas[box]
        aerated = intensities[box][ring] < AERATED_HU
        if aerated.size and aerated.mean() >= settings.max_gas_pocket_lung_border:
            continue
        dropped += int(np.count_nonzero(candidate[box] & near))
        candidate[box] &= ~near
        if settings.max_pocket_rim_mm > 0:
            rim_zone = distance <= settings.max_pocket_rim_mm
            del distance
            rim_zone &= ndimage.binary_dilation(intensities[box] >= AERATED_HU,
                                                structure=ellipsoid_structure(GAS_WALL_MM, spacing_zyx))
            rim_zones.append((box, rim_zone))
    rims = drop_pocket_rims(candidate, rim_zones)
    if dropped or rims:
        notes.append(
            f"dropped {(dropped + rims) * voxel_ml:.0f} mL of gas pockets not surrounded by lung (stomach, bowel or "
            f"air around the body: under {settings.max_gas_pocket_lung_border:.0%} of the tissue around them is "
            f"aerated lung), {rims * voxel_ml:.1f} mL of it their rims along walls or air-fluid levels"
        )


def drop_pocket_rims(candidate: np.ndarray, rim_zones: list[tuple[tuple[slice, ...], np.ndarray]]) -> int:
    """In place: the pieces of ``candidate`` that, in their axial slice, lie wholly in a dropped gas
    pocket's rim zone (``rim_zones``: each pocket's box and, inside it, the voxels within
    ``settings.max_pocket_rim_mm`` of the pocket and within ``GAS_WALL_MM`` of tissue denser than
    ``AERATED_HU``) go; returns how many voxels went.

    The wall takes ``GAS_WALL_MM``, but at a stomach's air-fluid level the gas reads a little denser
    than air and its partial volume with the fluid reaches a voxel or two further: a strip between the
    gas and the fluid that the network can call lung, joined in 3D to the lungs above. Lung beside a
    stomach reaches further from the gas or from the tissue in its slice and stays.
    """
    dropped = 0
    for z in sorted({z for box, _zone in rim_zones for z in range(box[0].start, box[0].stop)}):
        near = np.zeros(candidate.shape[1:], dtype=bool)
        for box, zone in rim_zones:
            if box[0].start <= z < box[0].stop:
                near[box[1:]] |= zone[z - box[0].start]
        pieces, count = label(candidate[z], np.ones((3, 3), dtype=bool))
        if not count:
            continue
        reaches_out = np.zeros(count + 1, dtype=bool)
        reaches_out[pieces[~near]] = True
        rim = ~reaches_out[pieces]
        rim &= pieces > 0
        dropped += int(np.count_nonzero(rim))
        candidate[z] &= ~rim
    return dropped


def drop_dense_false_lung(
    candidate: np.ndarray,
    lung: np.ndarray,
    intensities: np.ndarray,
    spacing_zyx: np.ndarray,
    settings: PostprocessingSettings,
    notes: list[str],
) -> None:
    """Step 0, dense part, in place: take network lung that is solid tissue far from any air out of
    ``candidate``.

    Lung is air and tissue mixed: a vessel or a fissure inside it is never more than a few millimetres
    from aerated lung (candidate voxels below ``AERATED_HU``). A core of ``lung`` voxels (the network's
    lung class; infection is left alone) more than ``DENSE_CORE_MM`` from aerated lung, of at least
    ``MIN_GAS_POCKET_ML``, with under ``max_dense_lung_border`` of the shell from ``DENSE_CORE_MM`` to
    ``DENSE_RING_MM`` around it aerated lung, is a contrast-filled stomach or bowel or the liver dome:
    it goes, with the non-aerated lung voxels within ``DENSE_CORE_MM`` of it. Dense lung that the
    network did not call infection (consolidation, atelectasis) borders aerated lung and stays.
    Worked on a grid of about ``DENSE_GRID_MM`` in-plane (distances on the full grid cost seconds).
    """
    step = max(1, int(DENSE_GRID_MM // float(min(spacing_zyx[1:]))))
    grid = (slice(None), slice(None, None, step), slice(None, None, step))
    coarse_spacing = spacing_zyx * np.array([1, step, step])
    aerated = candidate[grid] & (intensities[grid] < AERATED_HU)
    if not aerated.any():
        return
    lung_here = candidate[grid] & lung[grid] & ~aerated
    core = lung_here & (ndimage.distance_transform_edt(~aerated, sampling=coarse_spacing) > DENSE_CORE_MM)
    cores, large = large_components(core, float(np.prod(coarse_spacing)) / 1000.0,
                                    np.floor(DENSE_RING_MM / coarse_spacing).astype(int) + 1)
    dropped_coarse = np.zeros(core.shape, dtype=bool)
    for index, box in large:
        distance = ndimage.distance_transform_edt(cores[box] != index, sampling=coarse_spacing)
        ring = (distance > DENSE_CORE_MM) & (distance <= DENSE_RING_MM)
        if ring.any() and aerated[box][ring].mean() >= settings.max_dense_lung_border:
            continue
        dropped_coarse[box] |= (distance <= DENSE_CORE_MM) & lung_here[box]
    if not dropped_coarse.any():
        return
    dropped = np.repeat(np.repeat(dropped_coarse, step, axis=1), step, axis=2)[:, : candidate.shape[1], : candidate.shape[2]]
    dropped &= candidate & lung & (intensities >= AERATED_HU)
    candidate &= ~dropped
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    notes.append(
        f"dropped {np.count_nonzero(dropped) * voxel_ml:.0f} mL of dense tissue called lung with no air in it and "
        f"hardly any lung around it (stomach or bowel with contrast or food, liver)"
    )


def lung_components(
    candidate: np.ndarray,
    classes: np.ndarray,
    lung_class: int,
    intensities: np.ndarray,
    spacing_zyx: np.ndarray,
    intensities_in_hu: bool,
    settings: PostprocessingSettings,
    notes: list[str] | None = None,
    outside_air: Callable[[tuple[slice, ...], np.ndarray, float], float] | None = None,
) -> list[Component]:
    """At most the two largest 3D components of ``candidate`` that are inside the body, big and air-filled
    (median HU of their ``lung_class`` voxels in ``classes``). Clears the border-connected voxels of
    ``candidate`` in place (it is the largest array here; a copy would add its size to the peak memory).
    ``outside_air(box, mask, limit)``: :func:`outside_air_share` of a component in a box of ``candidate``;
    without it (or with ``settings.max_outside_air_share`` 1) components are not checked for lying outside
    the body."""
    notes = notes if notes is not None else []
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    outside = remove_border_connected(candidate)
    if outside:
        notes.append(f"dropped {outside * voxel_ml:.0f} mL connected to the image border (air outside the body)")
    box = bounding_box(candidate)
    if box is None:
        return []
    components, _count = label(candidate[box])
    sizes, order = large_components_first(components, voxel_ml, settings, notes)
    objects = ndimage.find_objects(components)
    kept: list[Component] = []
    for index in order:
        if len(kept) == 2:
            break
        sub = objects[index - 1]
        mask = components[sub] == index
        global_sub = shifted_box(sub, box)
        if intensities_in_hu:
            inside_lung = mask & (classes[global_sub] == lung_class)
            median = exact_median(intensities[global_sub][inside_lung if inside_lung.any() else mask])
            if median > settings.max_lung_median_hu:
                notes.append(
                    f"dropped a {sizes[index] * voxel_ml:.0f} mL component with median {median:.0f} HU (not "
                    f"air-filled: above {settings.max_lung_median_hu:g} HU, e.g. bowel or soft tissue)"
                )
                continue
            # Only a small second component is questioned: a lung the network under-segmented has a light
            # border too, and two lungs are never both dropped this way.
            small = bool(kept) and sizes[index] < SMALL_SECOND_COMPONENT * np.count_nonzero(kept[0].mask)
            light = light_shell_fraction(global_sub, mask, intensities) if small else 0.0
            if light > settings.max_light_shell_fraction:
                notes.append(
                    f"dropped a {sizes[index] * voxel_ml:.0f} mL component not wrapped in tissue ({light:.0%} of "
                    f"its border lighter than {AERATED_HU:g} HU: air or a cushion outside the body)"
                )
                continue
            # The largest component is left to the checks above: it spans the whole chest, and on whole
            # slices this check costs about 4 ms a slice.
            if kept and outside_air is not None and settings.max_outside_air_share < 1:
                share = outside_air(global_sub, mask, settings.max_outside_air_share)
                if share > settings.max_outside_air_share:
                    notes.append(
                        f"dropped a {sizes[index] * voxel_ml:.0f} mL component lying in air outside the body "
                        f"({share:.0%} of it: a cushion, blanket or room air around the patient)"
                    )
                    continue
        kept.append(Component(global_sub, mask))
    return kept


def outside_air_share(intensities: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, limit: float) -> float:
    """The share of ``mask`` (a component in ``box`` of ``intensities``, z, y, x in HU) that lies in air
    outside the body: voxels lighter than ``AERATED_HU`` that reach the image border through such voxels
    in their axial slice (air and foam around the body; the lungs, airways and bowel gas are walled in),
    computed on whole slices, from the component's largest cross-section down.

    It stops once the share can no longer exceed ``limit`` and returns what it found so far (at most
    ``limit``): a component inside the body costs about half its slices, and ``share > limit`` is decided
    as on all of them, where it holds with the exact share."""
    per_slice = mask.sum(axis=tuple(range(1, mask.ndim)))
    total = int(per_slice.sum())
    if total == 0:
        return 0.0
    unseen, outside = total, 0
    for index in np.argsort(per_slice, kind="stable")[::-1]:
        if outside + unseen <= limit * total or per_slice[index] == 0:
            break
        regions, touching = border_regions(intensities[box[0].start + index] < AERATED_HU)
        if touching is not None:
            outside += int(np.count_nonzero(touching[regions[box[1:]]] & mask[index]))
        unseen -= int(per_slice[index])
    return outside / total


def shifted_box(box: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``box``, given inside the box ``outer`` of an array, in that array's indices."""
    return tuple(slice(o.start + b.start, o.start + b.stop) for b, o in zip(box, outer))


def light_shell_fraction(box: tuple[slice, ...], mask: np.ndarray, intensities: np.ndarray) -> float:
    """The share of the in-plane one-voxel shell around ``mask`` (a component in ``box`` of
    ``intensities``) that reads lighter than ``AERATED_HU``. Real lungs measured 0.04-0.06 on the shared
    chest CTs (their shell is chest wall, mediastinum and diaphragm); the air and foam between a
    patient's back and the table that v1 called lung, 0.57 and 0.86."""
    grown = grown_box(box, (0, 1, 1), intensities.shape)
    inner = tuple(slice(part.start - outer.start, part.stop - outer.start) for part, outer in zip(box, grown))
    padded = np.zeros(tuple(part.stop - part.start for part in grown), dtype=bool)
    padded[inner] = mask
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    shell = ndimage.binary_dilation(padded, structure=in_plane) & ~padded
    if not shell.any():
        return 0.0
    return float(np.mean(intensities[grown][shell] < AERATED_HU))


def large_components_first(
    components: np.ndarray, voxel_ml: float, settings: PostprocessingSettings, notes: list[str]
) -> tuple[np.ndarray, list[int]]:
    """(voxels per label, the labels of at least ``min_lung_component_ml`` from the largest down); notes
    how many smaller ones there were."""
    sizes = component_sizes(components)
    sizes[0] = 0
    min_voxels = settings.min_lung_component_ml / voxel_ml
    order = [int(index) for index in np.argsort(sizes)[::-1] if sizes[index] >= min_voxels]
    small = int(np.count_nonzero((sizes > 0) & (sizes < min_voxels)))
    if small:
        notes.append(f"dropped {small} lung component(s) under {settings.min_lung_component_ml:g} mL")
    return sizes, order


def exact_median(values: np.ndarray) -> float:
    """``np.median(values)``; for integers (CT in HU) from a histogram, several times faster."""
    if values.dtype.kind not in "iu" or values.size == 0:
        return float(np.median(values))
    low = int(values.min())
    counts = np.cumsum(np.bincount(values.astype(np.intp) - low))  # widened first: int16 - min can overflow
    lower = int(np.searchsorted(counts, (values.size - 1) // 2, side="right"))  # the middle value(s) by rank
    upper = int(np.searchsorted(counts, values.size // 2, side="right"))
    return (lower + upper) / 2.0 + low


def remove_border_connected(mask: np.ndarray) -> int:
    """Clear, in place, the voxels of each axial slice that are 2D-connected to the slice's border;
    returns how many were cleared."""
    removed = 0
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        plane = mask[z]
        if not (plane[0].any() or plane[-1].any() or plane[:, 0].any() or plane[:, -1].any()):
            continue
        regions, touching = border_regions(plane)
        if touching is None:
            continue
        outside = touching[regions]
        removed += int(np.count_nonzero(outside))
        plane[outside] = False
    return removed


def border_regions(plane: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The 4-connected regions of the 2D mask ``plane`` (a label array) and a table, indexed by label,
    true for the regions that touch the border (None when there are no regions)."""
    regions, count = label(plane)
    if not count:
        return regions, None
    touching = np.zeros(count + 1, dtype=bool)
    for edge in (regions[0], regions[-1], regions[:, 0], regions[:, -1]):
        touching[edge] = True
    touching[0] = False
    return regions, touching


def body_midline_x(
    intensities: np.ndarray, lung_slices: np.ndarray, lung_columns: np.ndarray, intensities_in_hu: bool
) -> float:
    """The x index of the patient's midline: centre of the body (> -500 HU) in the lung slices (whole
    slices of ``intensities``), or for non-HU data the centre of the lungs' x extent (``lung_columns``)."""
    fallback = (lung_columns[0] + lung_columns[-1]) / 2.0
    if not intensities_in_hu:
        return float(fallback)
    step = max(1, len(lung_slices) // MIDLINE_SAMPLE_SLICES)
    body_columns = (intensities[lung_slices[::step]] > BODY_MIN_HU).sum(axis=(0, 1), dtype=np.int64)
    if body_columns.sum() == 0:
        return float(fallback)
    return float(np.average(np.arange(body_columns.size), weights=body_columns))


def split_left_right(
    lungs: list[Component],
    shape: tuple[int, ...],
    midline_x: float,
    spacing_zyx: np.ndarray,
    settings: PostprocessingSettings,
    x_offset: int = 0,
) -> np.ndarray:
    """uint8 side map of ``shape``: 1 right lung (x < midline side), 2 left lung, 0 elsewhere. The array
    is a box of the volume whose first column is ``x_offset``; ``midline_x`` is in the volume's columns.

    A component with at most ``straddle_fraction`` of its voxels across the midline goes wholly to its
    side; a straddling one (touching lungs) is cut per slice, see :func:`_cut_per_slice`.
    """
    side = np.zeros(shape, dtype=np.uint8)
    search = max(1, int(round(settings.midline_search_mm / spacing_zyx[2])))
    for component in lungs:
        box, mask = component.box, component.mask
        x = np.arange(x_offset + box[2].start, x_offset + box[2].stop)
        per_column = mask.sum(axis=(0, 1))
        right_fraction = per_column[x < midline_x].sum() / per_column.sum()
        if right_fraction >= 1.0 - settings.straddle_fraction:
            side[box][mask] = RIGHT_LUNG
        elif right_fraction <= settings.straddle_fraction:
            side[box][mask] = LEFT_LUNG
        else:
            side[box][mask] = _cut_per_slice(mask, x, midline_x, search)[mask]
    return side


def _cut_per_slice(mask: np.ndarray, x: np.ndarray, midline_x: float, search: int) -> np.ndarray:
    """Per axial slice, cut between the lung halves within ``search`` columns of the midline; columns
    left of the cut (smaller x) are right lung.

    The cut is an empty column inside the slice's lung extent when there is one (separate lungs),
    else the column with the fewest lung voxels among those with at least ``CUT_MIN_SIDE_FRACTION`` of
    the slice's lung on each side (so never a lung's thin outer tip); ties go to the column nearest
    the midline. A slice with no such column is cut at the midline.
    """
    result = np.zeros(mask.shape, dtype=np.uint8)
    distance = np.abs(x - midline_x)
    in_window = distance <= search
    for z in range(mask.shape[0]):
        counts = mask[z].sum(axis=0)
        total = counts.sum()
        if total == 0:
            continue
        occupied = np.flatnonzero(counts)
        inside = (np.arange(x.size) > occupied[0]) & (np.arange(x.size) < occupied[-1])
        gaps = np.flatnonzero(in_window & inside & (counts == 0))
        if gaps.size:
            best = gaps[np.argmin(distance[gaps])]
        else:
            before = np.cumsum(counts) - counts
            after = total - before - counts
            balanced = np.flatnonzero(
                in_window & (before >= CUT_MIN_SIDE_FRACTION * total) & (after >= CUT_MIN_SIDE_FRACTION * total)
            )
            if balanced.size:
                best = balanced[np.lexsort((distance[balanced], counts[balanced]))[0]]
            else:
                best = int(np.argmin(distance))
        result[z][:, :best] = RIGHT_LUNG
        result[z][:, best + 1 :] = LEFT_LUNG
        result[z][:, best] = RIGHT_LUNG if x[best] < midline_x else LEFT_LUNG
    return result


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes per axial slice (vessels, airways and lesions inside a lung), in the mask's bounding
    box: what ``ndimage.binary_fill_holes`` of each slice of the box gives, from one labelling of the
    background instead of a dilation grown slice by slice. (Filling the box in 3D afterwards would add
    nothing: every background voxel left is connected, within its slice, to the side of the box.)"""
    filled = np.zeros(mask.shape, dtype=bool)
    box = bounding_box(mask)
    if box is None:
        return filled
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    background, count = label(~mask[box], in_plane)
    outside = np.zeros(count + 1, dtype=bool)
    for axis in (1, 2):
        for end in (0, -1):
            outside[np.take(background, end, axis=axis)] = True
    outside[0] = False  # label 0 is the mask itself
    filled[box] = ~outside[background]
    return filled


def keep_infection_near_lungs(
    infection: np.ndarray, side: np.ndarray, spacing_zyx: np.ndarray, settings: PostprocessingSettings
) -> np.ndarray:
    """Infection inside the lungs, plus infection within ``infection_margin_mm`` of them, whose voxels
    are added to ``side`` (in place) on the side of the lung they are near."""
    lungs = side > 0
    kept = infection & lungs
    outside = infection & ~lungs
    radius = np.floor(settings.infection_margin_mm / spacing_zyx).astype(int)
    if not lungs.any() or not outside.any() or not radius.any():
        return kept
    box = bounding_box(outside, pad=radius, shape=infection.shape)
    structure = ellipsoid_structure(settings.infection_margin_mm, spacing_zyx)
    neighbourhoods = _neighbourhoods(outside[box], radius)
    for value in (RIGHT_LUNG, LEFT_LUNG):
        lung = side[box] == value
        near = np.zeros(lung.shape, dtype=bool)
        for hood in neighbourhoods:
            near[hood] |= ndimage.binary_dilation(lung[hood], structure=structure)
        near &= outside[box]
        side[box][near] = value
        outside[box] &= ~near
        kept[box] |= near
    return kept


def _neighbourhoods(mask: np.ndarray, radius: np.ndarray) -> list[tuple[slice, ...]]:
    """Boxes covering every voxel of ``mask`` together with all voxels within ``radius`` of it: one per
    26-connected component, grown by ``radius``. Dilating inside these boxes gives the dilation at the
    mask's voxels (a box cut short at another component only misses, and that component's own box
    has them all), at a small share of the cost of dilating the whole box around scattered specks."""
    groups, _count = label(mask, np.ones((3,) * mask.ndim, dtype=bool))
    return [grown_box(sub, radius, mask.shape) for sub in ndimage.find_objects(groups)]


def grown_box(box: tuple[slice, ...], margin: Sequence[int], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` grown by ``margin`` voxels per axis, clipped to ``shape``."""
    return tuple(slice(max(0, part.start - m), min(size, part.stop + m)) for part, m, size in zip(box, margin, shape))


def large_components(
    mask: np.ndarray, voxel_ml: float, margin: np.ndarray
) -> tuple[np.ndarray, list[tuple[int, tuple[slice, ...]]]]:
    """The 3D components of ``mask`` of at least ``MIN_GAS_POCKET_ML``: (their label array, and for each
    its label and its bounding box grown by ``margin`` voxels)."""
    components, count = label(mask)
    if not count:
        return components, []
    sizes = np.bincount(components[mask], minlength=count + 1)
    objects = ndimage.find_objects(components)
    return components, [(int(index), grown_box(objects[index - 1], margin, mask.shape))
                        for index in np.flatnonzero(sizes[1:] * voxel_ml >= MIN_GAS_POCKET_ML) + 1]


def unaerated_infection(
    infection: np.ndarray, side: np.ndarray, intensities: np.ndarray, min_aerated_fraction: float
) -> np.ndarray:
    """The infection components whose one-voxel shell holds less than ``min_aerated_fraction`` of
    aerated lung (lung voxels below ``AERATED_HU``)."""
    dropped = np.zeros(infection.shape, dtype=bool)
    box = bounding_box(infection, pad=np.ones(infection.ndim, dtype=int), shape=infection.shape)
    if box is None:
        return dropped
    components, _count = label(infection[box])
    aerated = (side[box] > 0) & ~infection[box] & (intensities[box] < AERATED_HU)
    for index, sub in enumerate(ndimage.find_objects(components), start=1):
        grown = tuple(slice(max(0, part.start - 1), part.stop + 1) for part in sub)
        mask = components[grown] == index
        shell = ndimage.binary_dilation(mask) & ~mask
        if shell.any() and aerated[grown][shell].mean() < min_aerated_fraction:
            dropped[box][grown] |= mask
    return dropped


def relabel_solid_nodules(
    infection: np.ndarray,
    intensities: np.ndarray,
    spacing_zyx: np.ndarray,
    settings: PostprocessingSettings,
    notes: list[str],
) -> None:
    """Step 6, in place: remove the :func:`solid_nodules` from ``infection`` (their voxels stay on their
    side of the lungs' side map: lung), with a note of the volume."""
    if settings.max_nodule_ml <= 0:
        return
    nodules = solid_nodules(infection, intensities, spacing_zyx, settings)
    if nodules.any():
        voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
        notes.append(
            f"called {np.count_nonzero(nodules) * voxel_ml:.1f} mL of infection lung: small solid components "
            f"(at most {settings.max_nodule_ml:.1f} mL, at least {settings.min_nodule_solid_share:.0%} above "
            f"{SOLID_HU:g} HU) are nodules, not pneumonia"
        )
        infection &= ~nodules


def solid_nodules(
    infection: np.ndarray, intensities: np.ndarray, spacing_zyx: np.ndarray, settings: PostprocessingSettings
) -> np.ndarray:
    """The 26-connected components of ``infection`` of at most ``settings.max_nodule_ml`` with at least
    ``settings.min_nodule_solid_share`` of their voxels above ``SOLID_HU`` (HU)."""
    nodules = np.zeros(infection.shape, dtype=bool)
    box = bounding_box(infection)
    if box is None:
        return nodules
    components, count = label(infection[box], np.ones((3,) * infection.ndim, dtype=bool))
    sizes = component_sizes(components, count + 1)
    solid = np.bincount(components[intensities[box] > SOLID_HU], minlength=count + 1)
    small = sizes * (float(np.prod(spacing_zyx)) / 1000.0) <= settings.max_nodule_ml
    nodular = small & (solid >= settings.min_nodule_solid_share * sizes)
    nodular[0] = False
    nodules[box] = nodular[components]
    return nodules


def remove_small_components(mask: np.ndarray, min_voxels: float) -> np.ndarray:
    """``mask`` without its 3D components smaller than ``min_voxels``."""
    box = bounding_box(mask)
    if box is None or min_voxels <= 1:
        return mask
    components, _count = label(mask[box])
    sizes = component_sizes(components)
    small = sizes < min_voxels
    small[0] = True
    result = mask.copy()
    result[box] = ~small[components]
    return result


def label(mask: np.ndarray, structure: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """``ndimage.label`` into uint16 (half the memory of its default int32: 0.5 GB less for the lungs'
    box of a 1000-slice scan), or int32 when there are more than 65535 components."""
    try:
        return ndimage.label(mask, structure, output=np.uint16)
    except RuntimeError:  # "insufficient bit-depth in requested output type"
        return ndimage.label(mask, structure)


def component_sizes(components: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount(components.ravel(), minlength=minlength)`` (voxels per label), counted slab by slab:
    in one go it would first copy the whole label array to 64-bit integers, 4 to 8 times its size."""
    sizes = np.zeros(minlength, dtype=np.int64)
    for slab in slabs(components.shape):
        counts = np.bincount(components[slab].ravel(), minlength=sizes.size)
        if counts.size > sizes.size:
            counts[: sizes.size] += sizes
            sizes = counts
        else:
            sizes += counts
    return sizes


def ellipsoid_structure(radius_mm: float, spacing_zyx: np.ndarray) -> np.ndarray:
    """Boolean ball of ``radius_mm`` on an anisotropic voxel grid (for dilation by a physical margin)."""
    radii = np.floor(radius_mm / spacing_zyx).astype(int)
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    distance = sum((grid * step) ** 2 for grid, step in zip(grids, spacing_zyx))
    return distance <= radius_mm**2 + 1e-9


def bounding_box(
    mask: np.ndarray, pad: np.ndarray | None = None, shape: tuple[int, ...] | None = None
) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every true voxel (optionally padded), or None if empty."""
    present = mask.any(axis=tuple(range(1, mask.ndim)))
    first = np.flatnonzero(present)
    if first.size == 0:
        return None
    # The first axis's extent first, then the others from that slab only: two passes, not one per axis.
    return box_from_extents(present, mask[first[0] : first[-1] + 1].any(axis=0), pad, shape or mask.shape)


def box_from_extents(
    present: np.ndarray, footprint: np.ndarray, pad: np.ndarray | None, shape: tuple[int, ...]
) -> tuple[slice, ...] | None:
    """The box of :func:`bounding_box` from which indices of the first axis hold a true voxel
    (``present``) and the union of the mask over that axis (``footprint``); None if none."""
    first = np.flatnonzero(present)
    if first.size == 0:
        return None
    extents = [first] + [
        np.flatnonzero(footprint.any(axis=tuple(a for a in range(footprint.ndim) if a != axis)))
        for axis in range(footprint.ndim)
    ]
    pad = np.zeros(len(extents), dtype=int) if pad is None else pad
    return tuple(
        slice(max(0, indices[0] - pad[axis]), min(shape[axis], indices[-1] + 1 + pad[axis]))
        for axis, indices in enumerate(extents)
    )
