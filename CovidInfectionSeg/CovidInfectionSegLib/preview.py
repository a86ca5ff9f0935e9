"""The preview PNG: a montage of axial slices across the lungs in a lung window, each segment as a
translucent colour with an outline, a legend and the key measurements as text. Callers that compare
the segments with something else (the training's whole-scan checks) can add masks drawn as outlines
only, and choose the slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import SimpleITK as sitk

from .atomic import OutputError, atomic_path
from .imageio import to_canonical
from .measurements import Measurements, RegionMeasurement

# Lung window (level -600, width 1500): parenchyma, ground glass and vessels all distinguishable.
LUNG_WINDOW_HU = (-1350.0, 150.0)
PREVIEW_SLICES = 12
PREVIEW_COLUMNS = 4
PREVIEW_TILE_PX = 320
OVERLAY_OPACITY = 0.35


@dataclass(frozen=True)
class Outline:
    """A mask drawn as an outline only, with a legend entry: ``mask`` is a (k, j, i) boolean array on
    the canonical LPS grid (:func:`imageio.to_canonical`) of the CT it is drawn on; ``color`` is RGB."""

    name: str
    color: tuple[int, int, int]
    mask: np.ndarray


def color_255(color: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(channel) for channel in color)  # type: ignore[return-value]


def segment_field(segment: Any, name: str) -> Any:
    """Read a field of a segment given as an object (SegmentInfo) or a manifest dictionary."""
    return segment[name] if isinstance(segment, dict) else getattr(segment, name)


def shorten(text: str, length: int) -> str:
    """Keep the end of a long text (a path's file name matters most)."""
    return text if len(text) <= length else "..." + text[-(length - 3):]


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
    ct_slice: np.ndarray, label_slice: np.ndarray, spacing: Sequence[float], colors: dict[int, tuple[int, int, int]],
    outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]] = (),
) -> np.ndarray:
    """One axial slice as a BGR tile with square pixels in millimetres (``PREVIEW_TILE_PX`` wide
    or high, whichever is longer): windowed CT, translucent segments, outlines, then the outline-only
    masks ``(mask slice, RGB)``."""
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
        _draw_outline(image, labels == value, rgb)
    for mask_slice, rgb in outlines:
        _draw_outline(image, cv2.resize(mask_slice.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0, rgb)
    return image


def _draw_outline(image: np.ndarray, mask: np.ndarray, rgb: Sequence[int]) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, tuple(int(c) for c in rgb[::-1]), 1, lineType=cv2.LINE_8)


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
    *,
    outlines: Sequence[Outline] = (),
    slice_indices: Sequence[int] | None = None,
) -> np.ndarray:
    """A BGR montage of axial slices across the lungs with overlays, legend and text lines.

    ``outlines`` are drawn over the segments as outlines only and join the legend; the slices and the
    crop then cover them too. ``slice_indices`` (canonical k) replaces the automatic choice of slices."""
    oriented_ct = to_canonical(ct_image)
    oriented_labels = to_canonical(labelmap)
    # views, not copies: only the dozen slices shown are read (a copy would be the whole CT)
    ct = sitk.GetArrayViewFromImage(oriented_ct)
    labels = sitk.GetArrayViewFromImage(oriented_labels)
    if ct.shape != labels.shape:
        raise ValueError(f"CT {ct.shape} and labelmap {labels.shape} differ in size (k, j, i)")
    for outline in outlines:
        if outline.mask.shape != labels.shape:
            raise ValueError(f"outline {outline.name!r} {outline.mask.shape} and labelmap {labels.shape} differ in size")
    spacing = oriented_labels.GetSpacing()
    colors = {int(segment_field(s, "value")): color_255(segment_field(s, "color")) for s in segments}
    footprint = labels > 0
    for outline in outlines:
        footprint = footprint | outline.mask
    row_crop, col_crop = _in_plane_crop(footprint, spacing)
    if slice_indices is None:
        slice_indices = choose_preview_slices(footprint)
    tiles = []
    for k in slice_indices:
        extra = [(outline.mask[k, row_crop, col_crop], outline.color) for outline in outlines]
        tile = _render_tile(ct[k, row_crop, col_crop], labels[k, row_crop, col_crop], spacing, colors, extra)
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
        rgb = color_255(segment_field(segment, "color"))
        cv2.rectangle(header, (x, legend_y - 12), (x + 14, legend_y + 2), tuple(int(c) for c in rgb[::-1]), -1)
        name = str(segment_field(segment, "name"))
        _put_text(header, name, (x + 20, legend_y))
        x += 40 + 10 * len(name)
    for outline in outlines:
        cv2.rectangle(header, (x, legend_y - 12), (x + 14, legend_y + 2), tuple(int(c) for c in outline.color[::-1]), 2)
        _put_text(header, outline.name, (x + 20, legend_y))
        x += 40 + 10 * len(outline.name)
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
    montage = render_preview(ct_image, labelmap, segments, measurement_lines(measurements), title)
    return write_png(montage, path)


def write_png(image: np.ndarray, path: str | Path) -> Path:
    """Encode a BGR image as PNG and write it atomically (all or nothing)."""
    path = Path(path)
    ok, encoded = cv2.imencode(".png", image)
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
