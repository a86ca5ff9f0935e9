"""The intensity recipe: how one axial CT slice becomes a network input.

Training (``training/``) and inference both call these functions, so the two cannot drift apart.
The recipe reproduces the export of the training slices (Ma et al. 2020 PNG export):
resize to 256x256 bicubic, per-slice min-max to [0, 1], x255 to uint8, CLAHE (clip 7.0, 8x8 tiles,
OpenCV semantics). Before the min-max we clip HU to a window named in the model manifest, because
scanners pad outside the field of view with -2048 or -3024 and metal goes far above 3000; a per-slice
min-max over such raw values turns lungs mid-grey, which the model reads as infection.

A recipe may give the network context across slices (a 2.5D input, ``context_slices``): each slice is
then segmented from a stack of itself and its neighbours above and below, each one put through the
same per-slice steps, as channels. Models without it (1.x, 2.0.0, 2.2.0) see one slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np


@dataclass(frozen=True)
class IntensityRecipe:
    """Preprocessing parameters, read from the ``recipe`` block of a model manifest."""

    input_size: int = 256
    hu_window: tuple[float, float] | None = (-1024.0, 3071.0)
    clahe_clip_limit: float = 7.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    pad_to_square: bool = True
    # 2.5D input: this many slices on each side of the segmented one join it as channels, lowest z
    # first; each neighbour is the slice nearest to ``context_mm`` (times 1, 2, ...) away, and at least
    # the next one (0: the adjacent slices). At the volume's ends the end slice stands in.
    context_slices: int = 0
    context_mm: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.context_slices < 0 or self.context_mm < 0:
            raise ValueError(f"context_slices and context_mm must be >= 0, got {self.context_slices} and {self.context_mm}")

    @property
    def channels(self) -> int:
        """The network's input channels: the slice and its neighbours."""
        return 2 * self.context_slices + 1

    @classmethod
    def from_manifest(cls, recipe: dict[str, Any]) -> "IntensityRecipe":
        """Build a recipe from a manifest's ``recipe`` dictionary; unknown keys are kept in ``extra``."""
        known = {"input_size", "hu_window", "clahe_clip_limit", "clahe_tile_grid", "pad_to_square", "context_slices",
                 "context_mm"}
        window = recipe.get("hu_window", cls.hu_window)
        return cls(
            input_size=int(recipe.get("input_size", cls.input_size)),
            hu_window=None if window is None else (float(window[0]), float(window[1])),
            clahe_clip_limit=float(recipe.get("clahe_clip_limit", cls.clahe_clip_limit)),
            clahe_tile_grid=tuple(int(v) for v in recipe.get("clahe_tile_grid", cls.clahe_tile_grid)),
            pad_to_square=bool(recipe.get("pad_to_square", cls.pad_to_square)),
            context_slices=int(recipe.get("context_slices", 0)),
            context_mm=float(recipe.get("context_mm", 0.0)),
            extra={k: v for k, v in recipe.items() if k not in known},
        )

    def to_manifest(self) -> dict[str, Any]:
        """The inverse of :meth:`from_manifest` (the context keys only where there is context, so a
        single-slice recipe reads as it did before they existed)."""
        context = {} if not self.context_slices else {"context_slices": self.context_slices,
                                                      "context_mm": self.context_mm}
        return {
            "input_size": self.input_size,
            "hu_window": None if self.hu_window is None else list(self.hu_window),
            "clahe_clip_limit": self.clahe_clip_limit,
            "clahe_tile_grid": list(self.clahe_tile_grid),
            "pad_to_square": self.pad_to_square,
            "resize": "bicubic",
            "normalization": "per-slice min-max to [0,1], x255, uint8, then CLAHE",
            **context,
            **self.extra,
        }


@dataclass(frozen=True)
class SliceGeometry:
    """How a slice of shape ``shape`` was padded to a square before resizing (to undo it)."""

    shape: tuple[int, int]
    pad_before: tuple[int, int]
    padded_size: int

    @classmethod
    def for_shape(cls, shape: tuple[int, int], pad_to_square: bool) -> "SliceGeometry":
        rows, cols = shape
        if not pad_to_square:
            return cls(shape=(rows, cols), pad_before=(0, 0), padded_size=0)
        size = max(rows, cols)
        return cls(shape=(rows, cols), pad_before=((size - rows) // 2, (size - cols) // 2), padded_size=size)


def make_clahe(recipe: IntensityRecipe) -> cv2.CLAHE:
    return cv2.createCLAHE(clipLimit=recipe.clahe_clip_limit, tileGridSize=recipe.clahe_tile_grid)


def minmax_to_uint8(image: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1], x255, truncated to uint8 (as the training export did)."""
    image = image.astype(np.float32, copy=False)
    low, high = float(image.min()), float(image.max())
    if high - low < 1e-6:
        return np.zeros(image.shape, dtype=np.uint8)
    scaled = (image - low) / (high - low) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def pad_to_square(image: np.ndarray, geometry: SliceGeometry, fill: float) -> np.ndarray:
    if geometry.padded_size == 0:
        return image
    rows, cols = geometry.shape
    size = geometry.padded_size
    top, left = geometry.pad_before
    if rows == cols:
        return image
    out = np.full((size, size), fill, dtype=image.dtype)
    out[top : top + rows, left : left + cols] = image
    return out


def preprocess_slice(
    slice_hu: np.ndarray, recipe: IntensityRecipe, clahe: cv2.CLAHE | None = None
) -> np.ndarray:
    """One 2D slice (rows x cols, HU or any scalar) -> uint8 network image of the recipe's size."""
    image = np.asarray(slice_hu, dtype=np.float32)
    if recipe.hu_window is not None:
        image = np.clip(image, recipe.hu_window[0], recipe.hu_window[1])
    geometry = SliceGeometry.for_shape(image.shape, recipe.pad_to_square)
    image = pad_to_square(image, geometry, fill=float(image.min()))
    size = recipe.input_size
    if image.shape != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC)
    image8 = minmax_to_uint8(image)
    return (clahe or make_clahe(recipe)).apply(image8)


def preprocess_slices(slices_hu: np.ndarray, recipe: IntensityRecipe) -> np.ndarray:
    """A stack of slices (n x rows x cols) -> uint8 stack (n x size x size)."""
    clahe = make_clahe(recipe)
    out = np.empty((len(slices_hu), recipe.input_size, recipe.input_size), dtype=np.uint8)
    for index, slice_hu in enumerate(slices_hu):
        out[index] = preprocess_slice(slice_hu, recipe, clahe)
    return out


def context_step(recipe: IntensityRecipe, slice_spacing_mm: float | None) -> int:
    """How many slices apart a slice's neighbours are taken: the nearest to ``recipe.context_mm``, at
    least 1 (1 when the recipe or the volume gives no distance)."""
    if not recipe.context_mm or not slice_spacing_mm:
        return 1
    return max(1, math.floor(recipe.context_mm / abs(slice_spacing_mm) + 0.5))


def context_indices(count: int, recipe: IntensityRecipe, slice_spacing_mm: float | None) -> np.ndarray:
    """For each of ``count`` slices, the slices of its network channels, lowest z first: int (count,
    channels); the end slice stands in beyond the volume's ends."""
    step = context_step(recipe, slice_spacing_mm)
    offsets = np.arange(-recipe.context_slices, recipe.context_slices + 1) * step
    return np.clip(np.arange(count)[:, None] + offsets, 0, count - 1)


def to_network_input(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 images (n x H x W), or stacks of them (n x channels x H x W) -> float32 (n x channels x H x W)
    in [0, 1], the model's input."""
    scaled = images_uint8.astype(np.float32) / 255.0
    return scaled[:, None] if scaled.ndim == 3 else scaled


def restore_slice_shape(label_or_prob: np.ndarray, geometry: SliceGeometry, nearest: bool) -> np.ndarray:
    """Undo resize and padding of a 2D network-sized map back to the slice's rows x cols."""
    rows, cols = geometry.shape
    size = geometry.padded_size or None
    target = (size, size) if size else (rows, cols)
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    if label_or_prob.shape[:2] != target:
        label_or_prob = cv2.resize(label_or_prob, (target[1], target[0]), interpolation=interpolation)
    if size:
        top, left = geometry.pad_before
        label_or_prob = label_or_prob[top : top + rows, left : left + cols]
    return label_or_prob
