"""Fainter infection: a labelled slice's infection brought part of the way back to the lung around it.

Issue 10's weakest fold holds out the cases whose ground glass is faintest. Measured on the PNG export
(2026-12-06 ad hoc, per slice, median over a case's slices): the infection's median gray level sits at
0.31-0.40 of the way from the clear lung's median to the soft tissue's (masses.soft_tissue_gray) in most
cases, 0.24-0.28 in cases 01, 13, 18 and 19 (02: 0.70, 07: 0.50). 2.2.0's recipe finds 40% of fold 2's
held-out infection (cases 01, 04, 18): the training data hold little ground glass that faint.

Fading lowers the lesion's smoothed density above the clear lung by a random factor, so its fine
texture (vessels, the lesion's own heterogeneity) stays and only its contrast drops; the label stays
infection. The fade blends over a pixel or two into the lung around the lesion, as partial volume
would, and never reaches outside the lung.

    python -m covidseg_training.faint_infection OUT.png [--data data/ma2020.npz]   # a preview of faded slices
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .data import INFECTION, LUNG

CONTRAST = (0.45, 0.85)  # the infection's density above the clear lung kept: 0.35 of the way to soft tissue -> 0.16-0.30
MIN_INFECTION_PIXELS = 50
MIN_CLEAR_LUNG_PIXELS = 500
DENSITY_SIGMA_PX = 2.0  # the smoothing that separates a lesion's density from its fine texture
EDGE_SIGMA_PX = 1.0


def fade_infection(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   contrast: tuple[float, float] = CONTRAST) -> np.ndarray:
    """``image`` (uint8) with its infection's density above the clear lung multiplied by a factor drawn
    from ``contrast``; unchanged where the slice has too little infection or clear lung to say."""
    infection = label == INFECTION
    clear = label == LUNG
    if np.count_nonzero(infection) < MIN_INFECTION_PIXELS or np.count_nonzero(clear) < MIN_CLEAR_LUNG_PIXELS:
        return image
    pixels = image.astype(np.float32)
    lung_gray = float(np.median(pixels[clear]))
    excess = np.maximum(cv2.GaussianBlur(pixels, (0, 0), DENSITY_SIGMA_PX) - lung_gray, 0.0)
    where = np.maximum(infection, cv2.GaussianBlur(infection.astype(np.float32), (0, 0), EDGE_SIGMA_PX))
    where *= label != 0
    kept = rng.uniform(*contrast)
    return np.clip(np.rint(pixels - (1.0 - kept) * excess * where), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    from .data import SliceDataset
    from .figures import painted_preview_parser, plot_painted_slices

    parser = painted_preview_parser("faint_infection", __doc__)
    parser.add_argument("--data", type=Path, default=Path("data/ma2020.npz"), help="a prepared .npz of slices")
    args = parser.parse_args(argv)
    try:
        slices = SliceDataset.load(args.data)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    infected = (slices.labels == INFECTION).sum(axis=(1, 2)) >= 20 * MIN_INFECTION_PIXELS
    chosen = rng.choice(np.flatnonzero(infected), min(args.count, int(infected.sum())), replace=False)
    rows = [(int(i), slices.images[i], fade_infection(slices.images[i], slices.labels[i], rng), slices.labels[i])
            for i in sorted(chosen)]
    plot_painted_slices(rows, args.out, what="fainter infection", painted_label=INFECTION,
                        title="infection faded toward the lung around it (outlined in blue: the infection)",
                        fill_labels=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
