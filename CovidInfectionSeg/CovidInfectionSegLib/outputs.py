"""Result files: Slicer segmentation (.seg.nrrd), labelmap (.nii.gz), measurements, preview PNG.

Every file is written under a temporary name and renamed when complete (:mod:`.atomic`), so a
crash or a full disk never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import SimpleITK as sitk
import slicerio

from .atomic import atomic_path, write_text_atomic
from .imageio import to_canonical
from .measurements import Measurements, RegionMeasurement
from .pipeline import SegmentationResult

# Lung window (level -600, width 1500): parenchyma, ground glass and vessels all distinguishable.
LUNG_WINDOW_HU = (-1350.0, 150.0)
PREVIEW_SLICES = 12
PREVIEW_COLUMNS = 4
PREVIEW_TILE_PX = 320
OVERLAY_OPACITY = 0.35
# gzip level of the .seg.nrrd: 3 compresses a 512 x 512 x 300 labelmap in 0.13 s to 0.9 MB, where
# pynrrd's default 9 takes 1.5 s for 0.3 MB (measured on the project's development CPU).
SEGMENTATION_GZIP_LEVEL = 3

TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

OUTPUT_SUFFIXES = {
    "segmentation": ".seg.nrrd",
    "labelmap": ".labels.nii.gz",
    "measurements_csv": ".measurements.csv",
    "measurements_json": ".measurements.json",
    "preview": ".preview.png",
}


class OutputError(RuntimeError):
    """An output folder or file cannot be written."""


def output_paths(outdir: str | Path, stem: str, preview: bool = True) -> dict[str, Path]:
    """The files :func:`write_all` writes for ``stem`` in ``outdir`` (key -> path)."""
    outdir = Path(outdir)
    return {
        key: outdir / f"{stem}{suffix}"
        for key, suffix in OUTPUT_SUFFIXES.items()
        if preview or key != "preview"
    }


def ensure_output_dir(outdir: str | Path) -> Path:
    """Create ``outdir`` (and parents) and check that files can be written in it.

    Raises :class:`OutputError` naming the folder and the reason (an existing file in the way,
    a parent that is a file, no permission), so callers can fail before any expensive work.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output folder {outdir} is an existing file, not a folder")
    for parent in outdir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create output folder {outdir}: {parent} is a file, not a folder")
            break
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {outdir}: {error.strerror or error}") from error
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {outdir} is not writable")
    return outdir


def _color_01(color: Sequence[int]) -> list[float]:
    """Manifest colours are 0-255 integers; Slicer wants 0-1 floats."""
    return [round(float(channel) / 255.0, 6) for channel in color]


def _color_255(color: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(channel) for channel in color)  # type: ignore[return-value]


def _segment_field(segment: Any, name: str) -> Any:
    """Read a field of a segment given as an object (SegmentInfo) or a manifest dictionary."""
    return segment[name] if isinstance(segment, dict) else getattr(segment, name)


def slicer_terminology(terminology: dict[str, Any]) -> dict[str, Any]:
    """Manifest terminology (``category``, ``type``, optional ``anatomic_region``, code triplets)
    -> slicerio's terminology dictionary (Slicer's ``TerminologyEntry`` tag)."""
    entry: dict[str, Any] = {
        "contextName": TERMINOLOGY_CONTEXT,
        "category": list(terminology["category"]),
        "type": list(terminology["type"]),
    }
    if terminology.get("type_modifier"):
        entry["typeModifier"] = list(terminology["type_modifier"])
    region = terminology.get("anatomic_region") or terminology.get("anatomicRegion")
    if region:
        entry["anatomicContextName"] = ANATOMIC_CONTEXT
        entry["anatomicRegion"] = list(region)
    return entry


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to physical LPS millimetres (SimpleITK is LPS)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_segmentation_nrrd(labelmap: sitk.Image, segments: Sequence[Any], path: str | Path) -> Path:
    """Write ``labelmap`` as a 3D Slicer ``.seg.nrrd`` with one named, coloured segment per entry
    of ``segments`` (objects or dictionaries with value, name, color, terminology).

    Slicer reads the label values, names, colours and terminology codes from the header; the
    geometry is the labelmap's own, so the segmentation overlays the CT it came from.
    """
    path = Path(path)
    # (i, j, k) as a Fortran-ordered view of the (k, j, i) buffer: pynrrd writes it in Fortran order,
    # so the bytes go out as they lie, without the transposed copy a C-ordered array needs.
    image = labelmap if labelmap.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(labelmap, sitk.sitkUInt8)
    voxels = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(labelmap),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": [],
    }
    for segment in segments:
        value = int(_segment_field(segment, "value"))
        name = str(_segment_field(segment, "name"))
        entry: dict[str, Any] = {
            "id": name.replace(" ", "_"),
            "name": name,
            "labelValue": value,
            "layer": 0,
            "color": _color_01(_segment_field(segment, "color")),
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
            "status": "completed",
        }
        terminology = _segment_field(segment, "terminology")
        if terminology:
            entry["terminology"] = slicer_terminology(terminology)
        segmentation["segments"].append(entry)
    with atomic_path(path) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=SEGMENTATION_GZIP_LEVEL)
    return path


def write_labelmap(labelmap: sitk.Image, path: str | Path) -> Path:
    """Write the labelmap (uint8, label values as in the manifest's segments) as NIfTI/NRRD by extension."""
    path = Path(path)
    with atomic_path(path) as temporary:
        sitk.WriteImage(sitk.Cast(labelmap, sitk.sitkUInt8), str(temporary), useCompression=True)
    return path


def _window_to_uint8(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW_HU) -> np.ndarray:
    low, high = window
    return (np.clip((hu.astype(np.float32) - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def choose_preview_slices(labels: np.ndarray, count: int = PREVIEW_SLICES) -> list[int]:
    """Up to ``count`` axial slice indices (of a k, j, i array) evenly spread over the slices that
    contain any label, or over the whole volume when nothing was segmented; superior first."""
    labelled = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    first, last = (int(labelled[0]), int(labelled[-1])) if labelled.size else (0, labels.shape[0] - 1)
    indices = np.unique(np.round(np.linspace(first, last, num=min(count, last - first + 1))).astype(int))
    return sorted(indices.tolist(), reverse=True)  # LPS: higher k is superior


def _in_plane_crop(labels: np.ndarray, spacing: Sequence[float], margin_mm: float = 20.0) -> tuple[slice, slice]:
    """Rows/columns around everything labelled (plus a margin), or the full plane when empty."""
    rows, cols = labels.shape[1:]
    footprint = labels.any(axis=0)
    if not footprint.any():
        return slice(0, rows), slice(0, cols)
    row_hits, col_hits = np.flatnonzero(footprint.any(axis=1)), np.flatnonzero(footprint.any(axis=0))
    row_margin, col_margin = int(margin_mm / spacing[1]), int(margin_mm / spacing[0])
    return (
        slice(max(0, row_hits[0] - row_margin), min(rows, row_hits[-1] + row_margin + 1)),
        slice(max(0, col_hits[0] - col_margin), min(cols, col_hits[-1] + col_margin + 1)),
    )


def _render_tile(
    ct_slice: np.ndarray, label_slice: np.ndarray, spacing: Sequence[float], colors: dict[int, tuple[int, int, int]]
) -> np.ndarray:
    """One axial slice as a BGR tile with square pixels in millimetres (``PREVIEW_TILE_PX`` wide
    or high, whichever is longer): windowed CT, translucent segments, outlines."""
    rows, cols = ct_slice.shape
    width_mm, height_mm = cols * spacing[0], rows * spacing[1]
    scale = PREVIEW_TILE_PX / max(width_mm, height_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))  # (width, height) for cv2
    gray = cv2.resize(_window_to_uint8(ct_slice), size, interpolation=cv2.INTER_LINEAR)
    labels = cv2.resize(label_slice.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR).astype(np.float32)
    for value, rgb in colors.items():
        mask = labels == value
        if mask.any():
            image[mask] = (1 - OVERLAY_OPACITY) * image[mask] + OVERLAY_OPACITY * np.array(rgb[::-1], np.float32)
    image = image.astype(np.uint8)
    for value, rgb in colors.items():
        contours, _ = cv2.findContours((labels == value).astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(image, contours, -1, tuple(int(c) for c in rgb[::-1]), 1, lineType=cv2.LINE_8)
    return image


def _shorten(text: str, length: int) -> str:
    """Keep the end of a long text (a path's file name matters most)."""
    return text if len(text) <= length else "..." + text[-(length - 3):]


def _put_text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.5,
              color: tuple[int, int, int] = (235, 235, 235), thickness: int = 1) -> None:
    # Hershey fonts are ASCII-only.
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    cv2.putText(image, ascii_text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness, cv2.LINE_AA)


def render_preview(
    ct_image: sitk.Image,
    labelmap: sitk.Image,
    segments: Sequence[Any],
    summary_lines: Sequence[str] = (),
    title: str = "",
) -> np.ndarray:
    """A BGR montage of axial slices across the lungs with overlays, legend and text lines."""
    oriented_ct = to_canonical(ct_image)
    oriented_labels = to_canonical(labelmap)
    # views, not copies: only the dozen slices shown are read (a copy would be the whole CT)
    ct = sitk.GetArrayViewFromImage(oriented_ct)
    labels = sitk.GetArrayViewFromImage(oriented_labels)
    if ct.shape != labels.shape:
        raise ValueError(f"CT {ct.shape} and labelmap {labels.shape} differ in size (k, j, i)")
    spacing = oriented_labels.GetSpacing()
    colors = {int(_segment_field(s, "value")): _color_255(_segment_field(s, "color")) for s in segments}
    row_crop, col_crop = _in_plane_crop(labels, spacing)
    slice_indices = choose_preview_slices(labels)
    tiles = []
    for k in slice_indices:
        tile = _render_tile(ct[k, row_crop, col_crop], labels[k, row_crop, col_crop], spacing, colors)
        cv2.rectangle(tile, (0, 0), (108, 22), (0, 0, 0), -1)
        _put_text(tile, f"slice {k + 1}/{labels.shape[0]}", (6, 16), 0.45)
        tiles.append(tile)
    columns = min(PREVIEW_COLUMNS, len(tiles))
    grid_rows = -(-len(tiles) // columns)
    tiles += [np.zeros_like(tiles[0])] * (grid_rows * columns - len(tiles))
    grid = np.vstack([np.hstack(tiles[r * columns : (r + 1) * columns]) for r in range(grid_rows)])
    if grid.shape[1] < 640:  # leave room for the text lines on narrow scans
        grid = np.hstack([grid, np.zeros((grid.shape[0], 640 - grid.shape[1], 3), np.uint8)])

    line_height = 22
    header_lines = ([title] if title else []) + list(summary_lines)
    header = np.full((14 + line_height * (len(header_lines) + 1), grid.shape[1], 3), 30, np.uint8)
    for index, line in enumerate(header_lines):
        _put_text(header, line, (10, 22 + index * line_height), 0.55 if index or not title else 0.65,
                  thickness=2 if index == 0 and title else 1)
    x = 10
    legend_y = 22 + len(header_lines) * line_height
    for segment in segments:
        rgb = _color_255(_segment_field(segment, "color"))
        cv2.rectangle(header, (x, legend_y - 12), (x + 14, legend_y + 2), tuple(int(c) for c in rgb[::-1]), -1)
        name = str(_segment_field(segment, "name"))
        _put_text(header, name, (x + 20, legend_y))
        x += 40 + 10 * len(name)
    footer = np.full((26, grid.shape[1], 3), 30, np.uint8)
    _put_text(footer, "Axial, superior first; patient right on image left. Research use only, not for diagnosis.",
              (10, 18), 0.45, (180, 180, 180))
    return np.vstack([header, grid, footer])


def write_preview_png(
    ct_image: sitk.Image,
    labelmap: sitk.Image,
    segments: Sequence[Any],
    measurements: Measurements,
    path: str | Path,
    title: str = "",
) -> Path:
    """Write a PNG montage of ~12 axial slices across the lungs: CT in a lung window, each segment
    as a translucent colour with an outline, a legend, and the key measurements as text."""
    path = Path(path)
    montage = render_preview(ct_image, labelmap, segments, measurement_lines(measurements), title)
    ok, encoded = cv2.imencode(".png", montage)
    if not ok:
        raise OutputError(f"could not encode preview image for {path}")
    with atomic_path(path) as temporary:
        temporary.write_bytes(encoded.tobytes())
    return path


def measurement_lines(measurements: Measurements) -> list[str]:
    """The key numbers as short lines of text (for the preview and the terminal)."""
    def side(label: str, region: RegionMeasurement) -> str:
        return (f"{label}: {region.lung_ml:.0f} ml, infection {region.infection_ml:.1f} ml "
                f"({region.percent_infected:.1f}%)")

    total = measurements.total
    return [
        side("Right lung", measurements.right_lung),
        side("Left lung", measurements.left_lung),
        f"{side('Both lungs', total)}; severity grade {total.grade} ({total.grade_name})",
    ]


def write_all(
    result: SegmentationResult, ct_image: sitk.Image, outdir: str | Path, stem: str, preview: bool = True
) -> dict[str, Path]:
    """Write every output of one segmentation into ``outdir`` (created if needed); return key -> path.

    ``measurements.json`` is :meth:`SegmentationResult.summary`: measurements plus the input
    (``result.source``), model, device, warnings and timings they came from. Earlier outputs of
    ``stem`` are removed first, so a folder holding every file of :func:`output_paths` is one
    complete result, never a mix of an old run and a new one that failed half way.
    """
    ensure_output_dir(outdir)
    paths = output_paths(outdir, stem, preview)
    for stale in output_paths(outdir, stem, preview=True).values():
        stale.unlink(missing_ok=True)
    write_segmentation_nrrd(result.labelmap, result.segments, paths["segmentation"])
    write_labelmap(result.labelmap, paths["labelmap"])
    result.measurements.write_csv(paths["measurements_csv"])
    write_text_atomic(paths["measurements_json"], json.dumps(result.summary(), indent=2) + "\n")
    if preview:
        title = f"CovidInfectionSeg {result.model_name} {result.model_version}: {_shorten(result.source or stem, 80)}"
        write_preview_png(ct_image, result.labelmap, result.segments, result.measurements, paths["preview"], title)
    return paths


def outputs_complete(outdir: str | Path, stem: str, preview: bool = True) -> bool:
    """True when every file :func:`write_all` writes for ``stem`` is present and not empty."""
    return all(path.is_file() and path.stat().st_size > 0 for path in output_paths(outdir, stem, preview).values())
