#!/usr/bin/env python
"""scikit-image against SciPy (and OpenCV) for the operations post-processing and the preview use.

On masks of a synthetic chest (default 512 x 512 x 300, the benchmark's volume): lungs are the air
inside the body (below -400 HU, not connected to the image border), whose vessels are holes; the
infection-like mask is everything between -700 and -300 HU inside the body, which is mostly specks.
Each operation runs ``--repeat`` times, interleaved, and the best time is printed with whether the
results are identical. ARCHITECTURE.md ("Which library does which job") records the choice.

    python benchmarks/postprocessing_libraries.py              # 512 x 512 x 300
    python benchmarks/postprocessing_libraries.py --slices 60 --repeat 2
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import cv2
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from skimage import measure, morphology, segmentation

from CovidInfectionSegLib.postprocessing import bounding_box, fill_holes, remove_small_components
from CovidInfectionSegLib.sample_data import synthetic_chest

SMALL_VOXELS = 64


def masks(size: int, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(lungs with vessel holes, infection-like specks) as (z, y, x) booleans."""
    hu = sitk.GetArrayFromImage(synthetic_chest(size=(size, size, slices), spacing=(0.7, 0.7, 1.0)))
    air = hu < -400
    regions, _count = ndimage.label(air)
    border = np.unique(np.concatenate([regions[:, 0].ravel(), regions[:, -1].ravel(),
                                       regions[:, :, 0].ravel(), regions[:, :, -1].ravel()]))
    lungs = air & ~np.isin(regions, border)
    body = ndimage.binary_fill_holes(hu[slices // 2] > -400)
    specks = (hu > -700) & (hu < -300) & body[None]
    return lungs, specks


def scipy_small_objects(mask: np.ndarray) -> np.ndarray:
    return remove_small_components(mask, SMALL_VOXELS)


def skimage_small_objects(mask: np.ndarray) -> np.ndarray:
    return morphology.remove_small_objects(mask, max_size=SMALL_VOXELS - 1, connectivity=1)


def scipy_fill_per_slice(mask: np.ndarray) -> np.ndarray:
    filled = mask.copy()
    for z in range(filled.shape[0]):
        if filled[z].any():
            filled[z] = ndimage.binary_fill_holes(filled[z])
    return ndimage.binary_fill_holes(filled)


def scipy_fill_in_box(mask: np.ndarray) -> np.ndarray:
    filled = np.zeros_like(mask)
    box = bounding_box(mask)
    filled[box] = scipy_fill_per_slice(mask[box])
    return filled


def opencv_outlines(tiles: list[np.ndarray]) -> list[np.ndarray]:
    """The preview's outlines today: contours drawn one pixel wide."""
    outlines = []
    for tile in tiles:
        canvas = np.zeros(tile.shape, np.uint8)
        contours, _ = cv2.findContours(tile.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, 1, 1, lineType=cv2.LINE_8)
        outlines.append(canvas.astype(bool))
    return outlines


def skimage_outlines(tiles: list[np.ndarray]) -> list[np.ndarray]:
    return [segmentation.find_boundaries(tile, connectivity=1, mode="inner") for tile in tiles]


def best_of(work: Callable[[], object], repeat: int) -> tuple[object, float]:
    best, value = float("inf"), None
    for _ in range(repeat):
        started = time.perf_counter()
        value = work()
        best = min(best, time.perf_counter() - started)
    return value, best


def same(a: object, b: object) -> str:
    if isinstance(a, list):
        differing = sum(int(np.count_nonzero(x != y)) for x, y in zip(a, b))
        total = sum(x.size for x in a)
        return "identical" if differing == 0 else f"{differing / total:.2%} of pixels differ"
    if isinstance(a, tuple):  # (labels, count): the same partition, numbered alike
        return "identical" if a[1] == b[1] and np.array_equal(a[0], b[0]) else "different"
    return "identical" if np.array_equal(a, b) else f"{np.count_nonzero(a != b)} voxels differ"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--slices", type=int, default=300, help="slices (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per operation; the best counts (default 3)")
    args = parser.parse_args(argv)
    lungs, specks = masks(args.size, args.slices)
    lung_box = lungs[bounding_box(lungs)]
    middle = np.linspace(0, args.slices - 1, 12).astype(int)
    tiles = [cv2.resize(lungs[k].astype(np.uint8), (320, 320), interpolation=cv2.INTER_NEAREST) for k in middle]
    face = ndimage.generate_binary_structure(3, 1)
    cases = [
        ("label 3D (lungs' box)", lambda: ndimage.label(lung_box, face), lambda: measure.label(lung_box, connectivity=1, return_num=True)),
        ("small-object removal (specks)", lambda: scipy_small_objects(specks), lambda: skimage_small_objects(specks)),
        ("hole filling (lungs)", lambda: scipy_fill_in_box(lungs), lambda: fill_holes(lungs)),
        ("outlines, 12 preview tiles", lambda: opencv_outlines(tiles), lambda: skimage_outlines(tiles)),
    ]
    names = {
        "label 3D (lungs' box)": ("scipy.ndimage.label", "skimage.measure.label"),
        "small-object removal (specks)": ("ours: ndimage.label + sizes", "skimage remove_small_objects"),
        "hole filling (lungs)": ("ndimage.binary_fill_holes", "ours: label the background"),
        "outlines, 12 preview tiles": ("cv2 findContours+drawContours", "skimage find_boundaries"),
    }
    print(f"masks of a {args.size} x {args.size} x {args.slices} synthetic chest: lungs {np.count_nonzero(lungs)} "
          f"voxels, specks {np.count_nonzero(specks)}; best of {args.repeat}")
    print(f"{'operation':<32} {'A':<32} {'s':>7}   {'B':<32} {'s':>7}  result")
    for label, first, second in cases:
        (a, seconds_a), (b, seconds_b) = best_of(first, args.repeat), best_of(second, args.repeat)
        name_a, name_b = names[label]
        print(f"{label:<32} {name_a:<32} {seconds_a:7.3f}   {name_b:<32} {seconds_b:7.3f}  {same(a, b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
