"""Synthetic solid masses (nodules, tumours) painted into a slice's lung and labelled "lung, no infection".

Issue 10's healthy scans show the network calling solid masses infection: the tumour of
example-chest-ct, LIDC-IDRI-0003's large nodule (60% of its nodule voxels for v2_dense's fold 1).
The training data hold almost none (the labelled slices are all infected; the negatives' nodules are
few and small), so the network never learns that a round solid lump in clear lung is not infection.
Painting such lumps into every kind of training slice, labelled lung, teaches it on both data paths
alike (so the mass does not become a path cue, see path_probe.py).

A mass is a lobulated disc (a few low harmonics on its radius, stretched and turned), sometimes
with spicules, its edge softened as partial volume would. Its gray level is the slice's own soft
tissue (the median of a ring just outside the lung: chest wall and mediastinum; 157-193 in the
labelled slices and about 180 on kernel B of example-chest-ct, whose tumour reads 124-164, measured
2026-11-30 ad hoc) times 0.8-1.0, with fine noise. It sits away from any infection and mostly inside
the lung: its centre at least 0.6 of its radius from the lung's edge, so a juxtapleural mass meets
the pleura but a pleural-based band that looks like subpleural consolidation is not drawn.

With ``halo_p`` a mass gets a ground-glass halo, as a part-solid nodule has (LIDC-IDRI-0003's largest
nodule is 58% ground glass) and as the lung around example-chest-ct's tumour reads: a wider, softer
disc around the core where the lung is raised part of the way to soft tissue (0.2-0.5 of it; the
labelled slices' infection sits at 0.35, IQR 0.28-0.42, measured 2026-12-05 ad hoc), vessels still
showing through, also labelled "lung, no infection".

With ``mass_label="classical"`` a mass is labelled as the classical HU lung mask (classical_lung.py), which is the
lung of the negatives and the whole-scan checks' reference, would label it: a mass that reaches the lung's
edge, or is larger than the holes that mask fills (``MAX_HOLE_CM2`` at the labelled slices' assumed
1.367 mm pixels), is not lung (background); a small mass inside the lung is lung. Its halo stays lung
(ground glass is below the mask's -320 HU). The default ``"lung"`` labels every mass lung.

    python -m covidseg_training.masses OUT.png [--data data/ma2020.npz] [--halo-p 1] [--mass-label classical]
    # a preview of painted slices
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .classical_lung import MAX_HOLE_CM2
from .data import BACKGROUND, INFECTION, LUNG, LUNG_UNKNOWN

RADIUS_PX = (2.5, 18.0)  # 256-pixel slices of 1.2-1.7 mm: masses of about 6 to 55 mm across
COUNT = (1, 3)
GRAY_OF_SOFT_TISSUE = (0.8, 1.0)
MIN_LUNG_PIXELS = 1500
INFECTION_CLEARANCE_PX = 4  # between a mass's outline and any infection
HALO_RADIUS = (1.4, 2.0)  # a halo's outer radius, in radii of its core
HALO_TOWARD_SOFT_TISSUE = (0.2, 0.5)
HALO_BLUR_PX = (1.5, 3.0)
MASS_LABELS = ("lung", "classical")
# The labelled slices' assumed in-plane pixel, as model_and_data.DEFAULT_PIXEL_MM (not imported from there: that
# module imports the training loop, which imports this one).
ASSUMED_PIXEL_MM = 350.0 / 256
MAX_HOLE_PX = MAX_HOLE_CM2 * 100.0 / ASSUMED_PIXEL_MM**2
EDGE_PX = 1.5  # a mass this close to the lung's edge reaches it


def classical_mass_label(core: np.ndarray, from_edge: np.ndarray) -> int:
    """How the classical lung mask labels a mass whose core is ``core`` (boolean), ``from_edge`` the lung's
    distance transform: ``BACKGROUND`` where it reaches the lung's edge or is larger than ``MAX_HOLE_PX``,
    else ``LUNG`` (a hole the mask fills)."""
    if not core.any():
        return LUNG
    reaches_edge = float(from_edge[core].min()) <= EDGE_PX
    return BACKGROUND if reaches_edge or np.count_nonzero(core) > MAX_HOLE_PX else LUNG


def soft_tissue_gray(image: np.ndarray, lung: np.ndarray) -> float:
    """The median gray level of a ring 3-8 pixels outside the lung (chest wall and mediastinum)."""
    near = cv2.dilate(lung.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (17, 17))) > 0
    touching = cv2.dilate(lung.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))) > 0
    ring = near & ~touching
    return float(np.median(image[ring])) if ring.any() else 170.0


def mass_shape(shape: tuple[int, int], centre: tuple[float, float], radius: float,
               rng: np.random.Generator, spicule_p: float = 1 / 3) -> np.ndarray:
    """A float32 coverage map (0-1) of one mass: a lobulated, stretched disc, spiculated with
    probability ``spicule_p``, its edge blurred by 0.4-1.2 pixels."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    stretch = rng.uniform(0.7, 1.0)
    dy, dx = rows - centre[0], cols - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / stretch
    theta = np.arctan2(v, u)
    outline = np.ones_like(theta)
    for harmonic in range(2, 6):
        outline += rng.uniform(0, 0.12) * np.cos(harmonic * theta + rng.uniform(0, 2 * np.pi))
    coverage = (np.hypot(u, v) <= radius * outline).astype(np.float32)
    if rng.random() < spicule_p:
        for direction in rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))):
            length = radius * rng.uniform(1.3, 2.0)
            end = (centre[1] + length * np.cos(direction), centre[0] + length * np.sin(direction))
            cv2.line(coverage, (round(centre[1]), round(centre[0])), (round(end[0]), round(end[1])), 1.0, 1)
    return cv2.GaussianBlur(coverage, (0, 0), rng.uniform(0.4, 1.2))


def halo_shape(shape: tuple[int, int], centre: tuple[float, float], radius: float,
               rng: np.random.Generator) -> np.ndarray:
    """A float32 coverage map (0-1) of a ground-glass halo's outer extent: a lobulated disc of
    ``HALO_RADIUS`` times the core's radius, without spicules, its edge blurred by ``HALO_BLUR_PX``."""
    outer = mass_shape(shape, centre, radius * rng.uniform(*HALO_RADIUS), rng, spicule_p=0.0)
    return cv2.GaussianBlur(outer, (0, 0), rng.uniform(*HALO_BLUR_PX))


def paint_masses(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 halo_p: float = 0.0, mass_label: str = "lung") -> tuple[np.ndarray, np.ndarray]:
    """``image`` (uint8) with 1-3 solid masses painted into its lung and ``label`` with "lung, no
    infection" (``LUNG``) under them, or with ``mass_label="classical"`` what :func:`classical_mass_label`
    says; both unchanged where the slice has too little clear lung. Each mass has a ground-glass halo with
    probability ``halo_p`` (labelled ``LUNG``)."""
    if mass_label not in MASS_LABELS:
        raise ValueError(f"mass_label must be one of {', '.join(MASS_LABELS)}, not {mass_label!r}")
    lung = (label == LUNG) | (label == LUNG_UNKNOWN)
    if np.count_nonzero(lung) < MIN_LUNG_PIXELS:
        return image, label
    from_edge = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5)
    from_infection = cv2.distanceTransform((label != INFECTION).astype(np.uint8), cv2.DIST_L2, 5)
    gray = soft_tissue_gray(image, lung)
    clear = from_infection >= INFECTION_CLEARANCE_PX  # a halo's lobes may reach past the clearance of its centre
    painted, new_label = image.astype(np.float32), label.copy()
    for _ in range(int(rng.integers(COUNT[0], COUNT[1] + 1))):
        radius = float(np.exp(rng.uniform(*np.log(RADIUS_PX))))
        # Spicules reach up to 2 radii: the clearance keeps them off the infection too.
        room = (from_edge >= 0.6 * radius) & (from_infection >= 2.2 * radius + INFECTION_CLEARANCE_PX)
        candidates = np.flatnonzero(room)
        if not len(candidates):
            continue
        centre = np.unravel_index(int(rng.choice(candidates)), label.shape)
        coverage = mass_shape(label.shape, centre, radius, rng) * lung
        if halo_p and rng.random() < halo_p:
            halo = np.clip(halo_shape(label.shape, centre, radius, rng) - coverage, 0, 1) * lung * clear
            painted = painted + rng.uniform(*HALO_TOWARD_SOFT_TISSUE) * (gray - painted) * halo
            new_label[(halo > 0.5) & lung] = LUNG
        noise = cv2.GaussianBlur(rng.normal(0, 1, label.shape).astype(np.float32), (0, 0), 0.7)
        texture = gray * rng.uniform(*GRAY_OF_SOFT_TISSUE) + rng.uniform(3, 10) * noise / max(float(noise.std()), 1e-6)
        painted = painted * (1 - coverage) + texture * coverage
        core = (coverage > 0.5) & lung
        new_label[core] = LUNG if mass_label == "lung" else classical_mass_label(core, from_edge)
    return np.clip(painted, 0, 255).astype(np.uint8), new_label


def main(argv: list[str] | None = None) -> int:
    from .data import SliceDataset
    from .figures import painted_preview_parser, plot_painted_slices

    parser = painted_preview_parser("masses", __doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ma2020.npz"), help="a prepared .npz of slices")
    parser.add_argument("--halo-p", type=float, default=0.0, help="the share of masses with a ground-glass halo")
    parser.add_argument("--mass-label", choices=MASS_LABELS, default="lung",
                        help="lung: every mass lung; classical: as the classical HU lung mask labels it")
    args = parser.parse_args(argv)
    if not 0.0 <= args.halo_p <= 1.0:
        parser.error(f"--halo-p must lie in [0, 1], not {args.halo_p}")
    try:
        slices = SliceDataset.load(args.data)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    lung_pixels = (slices.labels == LUNG).sum(axis=(1, 2))
    chosen = rng.choice(np.flatnonzero(lung_pixels >= 2 * MIN_LUNG_PIXELS), args.count, replace=False)
    rows = [(int(i), slices.images[i],
             *paint_masses(slices.images[i], slices.labels[i], rng, args.halo_p, args.mass_label))
            for i in sorted(chosen)]
    others = "; the others not lung, a notch in the lung's outline" if args.mass_label == "classical" else ""
    plot_painted_slices(rows, args.out, what="masses", painted_label=LUNG,
                        title=f"synthetic masses (outlined in blue: lung, no infection{others}); lung outlined, "
                              "infection filled")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
