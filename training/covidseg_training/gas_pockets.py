"""Synthetic pockets of gas (an air-filled stomach or bowel loop) painted into a negative slice's
abdomen and labelled background.

2.0.0's network alone calls covid-chest-ct's air-filled stomach lung (246.5 mL in its 17 lowest
slices; only the post-processing takes it out): the negatives' stomachs are contrast-filled or
collapsed, so the network has hardly seen a large pocket of pure gas in soft tissue that is not lung.
Painting such pockets into the negative slices, away from their lung, shows it one on every level.

A pocket is a lobulated disc at the slice's own air gray level (its darkest percent: the room air
around the body) with fine noise, its edge softened as partial volume would; in three of five it has
a gas-fluid level, its posterior part (lower rows: the patient lies on the back) left as the tissue
that was there. It lies inside the body, at least ``WALL_PX`` beyond its radius from the body's edge
and from any lung or dark pixel, so it is wrapped in soft tissue as a stomach is.

    python -m covidseg_training.gas_pockets OUT.png [--root FOLDER]   # a preview of painted negatives
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .data import BACKGROUND
from .masses import mass_shape

RADIUS_PX = (8.0, 35.0)  # 256-pixel slices of 1.2-1.7 mm: pockets of about 2 to 12 cm across
COUNT = (1, 2)
WALL_PX = 4  # soft tissue kept between a pocket and the body's edge, the lung or other gas
FLUID_LEVEL_P = 0.6
BODY_GRAY_ABOVE_AIR = 35.0  # a pixel this much above the air gray level (blurred) is tissue


def tissue_mask(image: np.ndarray, air_gray: float) -> np.ndarray:
    """Soft tissue and bone of the body: the blurred slice more than ``BODY_GRAY_ABOVE_AIR`` above air,
    its largest component (the body, not the table)."""
    tissue = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.5) > air_gray + BODY_GRAY_ABOVE_AIR
    count, components, stats, _ = cv2.connectedComponentsWithStats(tissue.astype(np.uint8), connectivity=8)
    if count < 2:
        return np.zeros(image.shape, dtype=bool)
    return components == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def paint_gas_pockets(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                      radius_px: tuple[float, float] = RADIUS_PX,
                      fluid_level_p: float = FLUID_LEVEL_P) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (uint8) with 1-2 pockets of gas painted into its soft tissue, and ``label`` as it was:
    the pockets lie only where it is background already. ``image`` is unchanged where no pocket fits.
    ``radius_px``: the range of a pocket's radius (drawn log-uniformly), in pixels of the slice;
    ``fluid_level_p``: the share of pockets with a gas-fluid level (a straight lower edge)."""
    air_gray = float(np.percentile(image, 1))
    tissue = tissue_mask(image, air_gray)
    # Distance to anything that is not tissue: outside the body, lung (labelled or dark), other gas.
    solid = tissue & (label == BACKGROUND)
    from_edge = cv2.distanceTransform(solid.astype(np.uint8), cv2.DIST_L2, 5)
    painted = image.astype(np.float32)
    taken = np.zeros(label.shape, dtype=bool)
    for _ in range(int(rng.integers(COUNT[0], COUNT[1] + 1))):
        radius = float(np.exp(rng.uniform(*np.log(radius_px))))
        # The lobulated outline reaches about 1.5 radii at most.
        room = (from_edge >= 1.5 * radius + WALL_PX) & ~taken
        candidates = np.flatnonzero(room)
        if not len(candidates):
            continue
        centre = np.unravel_index(int(rng.choice(candidates)), label.shape)
        coverage = mass_shape(label.shape, centre, radius, rng, spicule_p=0.0)
        if rng.random() < fluid_level_p:
            level = centre[0] + rng.uniform(-0.3, 0.6) * radius
            rows = np.arange(label.shape[0], dtype=np.float32)[:, None]
            coverage *= np.clip(level - rows + 0.5, 0.0, 1.0)  # the fluid below stays tissue
        coverage *= solid
        noise = cv2.GaussianBlur(rng.normal(0, 1, label.shape).astype(np.float32), (0, 0), 0.7)
        texture = air_gray + rng.uniform(1, 4) * noise / max(float(noise.std()), 1e-6)
        painted = painted * (1 - coverage) + texture * coverage
        taken |= cv2.dilate((coverage > 0).astype(np.uint8), np.ones((2 * WALL_PX + 1,) * 2, np.uint8)) > 0
    return np.clip(painted, 0, 255).astype(np.uint8), label


def main(argv: list[str] | None = None) -> int:
    from CovidInfectionSegLib.preprocessing import IntensityRecipe

    from .figures import painted_preview_parser, plot_painted_slices
    from .negatives import NegativesConfig, load_negatives

    parser = painted_preview_parser("gas_pockets", __doc__)
    parser.add_argument("--root", default="", help="the folder holding the negative scans (default ../shared/data)")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"),
                        help="where training caches the negatives' slices (read when there, written when not)")
    args = parser.parse_args(argv)
    negatives = NegativesConfig(root=args.root)  # the training negatives, on 256-pixel slices as trained
    try:
        scans = load_negatives(negatives, IntensityRecipe(input_size=256), negatives.scans_for_fold(None),
                               cache_dir=args.cache)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    # Slices from below the lungs to their bases, where a stomach lies.
    pool = [(scan, int(i)) for scan in scans for i in np.flatnonzero(scan.levels < 0.15)]
    if not pool:
        print("error: the negative scans have no slice below their lung bases", file=sys.stderr)
        return 2
    rows = []
    for pick in sorted(rng.choice(len(pool), min(args.count, len(pool)), replace=False)):
        scan, index = pool[int(pick)]
        image, label = scan.slices.images[index], scan.slices.labels[index]
        rows.append((f"{index} of {scan.name}", image, *paint_gas_pockets(image, label, rng)))
    plot_painted_slices(rows, args.out, what="gas pockets", painted_label=BACKGROUND,
                        title="synthetic gas pockets (outlined in blue: background); lung outlined")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
