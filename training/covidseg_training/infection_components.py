"""What the infection of a whole-scan result is made of: one row per 3D infection component.

On a healthy scan every infection voxel is false, and the rows say where it sits and what it looks
like in HU: one large component around a solid mass (a tumour and the lung around it), many small
ones in dependent lung, a part-solid nodule. That tells the next training recipe what to teach, where
the scan's total infection mL alone does not. Density bands on the CT in HU:

- solid: above ``SOLID_HU`` (soft tissue, consolidation, a solid nodule's core);
- ground glass: from ``GROUND_GLASS_HU`` up to ``DENSE_HU`` (hazy lung);
- aerated: below ``GROUND_GLASS_HU`` (ordinary lung);
- the rest, ``DENSE_HU`` to ``SOLID_HU``, is counted in none of the three.

``largest_solid_ml`` is the largest connected solid part inside the component: a compact mass gives
one large part, patchy consolidation several small ones.

:func:`mask_components` gives the same rows for any mask: the whole-scan checks use it for the model
lung outside the classical lung (a solid mass called lung, gas in the stomach called lung).
"""

from __future__ import annotations

import csv
import io
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from CovidInfectionSegLib.postprocessing import INFECTION, SOLID_HU, label

DENSE_HU = -300.0
GROUND_GLASS_HU = -750.0
MIN_COMPONENT_ML = 0.1

COMPONENT_COLUMNS = (
    "rank", "ml", "first_slice", "last_slice", "median_hu", "solid_percent", "ground_glass_percent",
    "aerated_percent", "largest_solid_ml", "in_nodules_percent",
)


def infection_components(labels: np.ndarray, ct_hu: np.ndarray, spacing_zyx: Sequence[float],
                         nodules: np.ndarray | None = None,
                         min_ml: float = MIN_COMPONENT_ML) -> list[dict[str, Any]]:
    """The 26-connected components of ``labels == INFECTION`` of at least ``min_ml``, largest first.

    ``labels`` (the engine's labelmap), ``ct_hu`` and ``nodules`` (a boolean mask, e.g. the LIDC
    readers' nodules) share one canonical (z, y, x) grid; slices are indices along z. Each row holds
    the columns of ``COMPONENT_COLUMNS`` (``in_nodules_percent`` only with ``nodules``)."""
    return mask_components(labels == INFECTION, ct_hu, spacing_zyx, nodules, min_ml)


def mask_components(mask: np.ndarray, ct_hu: np.ndarray, spacing_zyx: Sequence[float],
                    nodules: np.ndarray | None = None,
                    min_ml: float = MIN_COMPONENT_ML) -> list[dict[str, Any]]:
    """The 26-connected components of the boolean ``mask`` of at least ``min_ml``, largest first, with
    the rows of :func:`infection_components`."""
    if mask.shape != ct_hu.shape or (nodules is not None and nodules.shape != mask.shape):
        raise ValueError(f"mask {mask.shape}, CT {ct_hu.shape} and nodules "
                         f"{None if nodules is None else nodules.shape} must share one grid")
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    components, _count = label(mask, np.ones((3, 3, 3), dtype=bool))
    rows = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        inside = components[box] == index
        voxels = int(inside.sum())
        if voxels * voxel_ml < min_ml:
            continue
        hu = ct_hu[box][inside]
        solid = inside & (ct_hu[box] > SOLID_HU)
        parts, count = label(solid, np.ones((3, 3, 3), dtype=bool))
        largest_solid = int(np.bincount(parts[solid]).max()) if count else 0
        row = {
            "ml": voxels * voxel_ml, "first_slice": box[0].start, "last_slice": box[0].stop - 1,
            "median_hu": float(np.median(hu)),
            "solid_percent": 100.0 * float(np.mean(hu > SOLID_HU)),
            "ground_glass_percent": 100.0 * float(np.mean((hu >= GROUND_GLASS_HU) & (hu < DENSE_HU))),
            "aerated_percent": 100.0 * float(np.mean(hu < GROUND_GLASS_HU)),
            "largest_solid_ml": largest_solid * voxel_ml,
            "in_nodules_percent": 100.0 * float(nodules[box][inside].mean()) if nodules is not None else "",
        }
        rows.append(row)
    rows.sort(key=lambda row: -row["ml"])
    return [{"rank": rank, **row} for rank, row in enumerate(rows, start=1)]


def components_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`infection_components` as CSV (volumes to 3 decimals, percents to 1)."""
    return rows_csv(rows, COMPONENT_COLUMNS)


def rows_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV with ``columns``, floats rounded to 3 decimals."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: round(value, 3) if isinstance(value, float) else value for key, value in row.items()})
    return buffer.getvalue()


def components_markdown(scan_rows: dict[str, Sequence[dict[str, Any]]], most: int = 5,
                        nodule_column: bool = True) -> list[str]:
    """Markdown lines: for each scan, its ``most`` largest components; ``nodule_column`` False leaves out
    "in nodules, %" (for masks that are not infection, where it is never measured)."""
    header = ("| scan | component | mL | slices | median HU | solid / ground glass / aerated, % | "
              "largest solid part, mL |")
    lines = [header + " in nodules, % |" if nodule_column else header,
             "|---|---|---|---|---|---|---|" + ("---|" if nodule_column else "")]
    for scan, rows in scan_rows.items():
        for row in rows[:most]:
            line = (f"| {scan} | {row['rank']} of {len(rows)} | {row['ml']:.1f} | "
                    f"{row['first_slice']}-{row['last_slice']} | {row['median_hu']:.0f} | "
                    f"{row['solid_percent']:.0f} / {row['ground_glass_percent']:.0f} / {row['aerated_percent']:.0f} | "
                    f"{row['largest_solid_ml']:.1f} |")
            if nodule_column:
                line += " - |" if row["in_nodules_percent"] == "" else f" {row['in_nodules_percent']:.0f} |"
            lines.append(line)
    return lines
