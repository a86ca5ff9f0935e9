"""The infection's largest lesion, and a warning when most of the infection is one focal lesion.

COVID-19 pneumonia is usually patchy and in several places. The model's best-known false infection is
a different picture: a tumour or a large nodule, with the lung around it, called infection as one
compact lesion (model card, *Known limits*). On the shared healthy scan with a left upper lobe tumour,
that one lesion holds 92% and 76% of the infection found on its two reconstruction kernels, 7 cm
across at most; on the real COVID-19 scan the largest lesion is 16 cm across. So when one lesion of at
least ``MIN_FOCAL_LESION_ML``, no more than ``MAX_FOCAL_EXTENT_MM`` across in any direction, holds
``MIN_FOCAL_SHARE`` of the infection or more, the result says so and asks for a look. It is a hint
for the reader, not a finding: a single COVID-19 lesion gives it too. The segmentation is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .postprocessing import bounding_box, component_sizes, label

MIN_FOCAL_LESION_ML = 5.0
MIN_FOCAL_SHARE = 0.5
MAX_FOCAL_EXTENT_MM = 80.0
SIDE_NAMES = {1: "right", 2: "left"}


@dataclass(frozen=True)
class Lesion:
    """One 3D infection component: its volume, its share of all infection, its largest bounding-box
    side in mm and the lung it lies in ("right", "left")."""

    ml: float
    share: float
    extent_mm: float
    side: str

    def to_dict(self) -> dict[str, float | str]:
        return {"ml": round(self.ml, 2), "share": round(self.share, 3), "extent_mm": round(self.extent_mm, 1),
                "side": self.side}


def largest_lesion(infection: np.ndarray, side: np.ndarray, spacing_zyx: tuple[float, float, float]) -> Lesion | None:
    """The largest 26-connected component of ``infection`` (canonical z, y, x; ``side`` 1 right, 2 left
    for lung voxels), or None when there is no infection."""
    box = bounding_box(infection)
    if box is None:
        return None
    components, _count = label(infection[box], np.ones((3, 3, 3), dtype=bool))
    sizes = component_sizes(components)
    sizes[0] = 0
    index = int(np.argmax(sizes))
    sub = ndimage.find_objects(components, max_label=index)[index - 1]
    extent = max((part.stop - part.start) * step for part, step in zip(sub, spacing_zyx))
    sides = np.bincount(side[box][sub][components[sub] == index], minlength=3)[1:3]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    return Lesion(ml=float(sizes[index]) * voxel_ml, share=float(sizes[index]) / float(sizes.sum()),
                  extent_mm=float(extent), side=SIDE_NAMES[int(np.argmax(sides)) + 1])


def focal_lesion_warning(lesion: Lesion | None, infection_ml: float, name: str) -> str | None:
    """The warning for a focal lesion that holds most of the infection (see the module doc), or None."""
    if (lesion is None or lesion.ml < MIN_FOCAL_LESION_ML or lesion.share < MIN_FOCAL_SHARE
            or lesion.extent_mm > MAX_FOCAL_EXTENT_MM):
        return None
    return (f"{name}: {lesion.ml:.0f} of the {infection_ml:.0f} mL of infection is one focal lesion in the "
            f"{lesion.side} lung, {lesion.extent_mm / 10:.0f} cm across at most; COVID-19 pneumonia is usually "
            "patchy and in several places, while a tumour or nodule and the lung around it can be called "
            "infection: check this lesion by eye")
