"""Segmentation metrics on binary 2D masks: overlap (Dice, IoU, precision, recall) and surface
(normalised surface Dice at a tolerance, 95th-percentile Hausdorff distance), with pixel spacing in mm.

Surface distances are measured between boundary pixels (a foreground pixel with a background
4-neighbour) with SciPy's exact Euclidean distance transform. Conventions for empty masks:
both empty -> Dice/IoU/precision/recall/NSD 1 and HD95 0; one empty -> 0 and HD95 = the image
diagonal in mm (the largest distance possible, so a miss is penalised instead of dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass
class Counts:
    """Pixel counts of one comparison; sums of Counts give pooled (per-case, per-fold) overlap."""

    true_positive: int = 0
    false_positive: int = 0
    false_negative: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.true_positive + other.true_positive, self.false_positive + other.false_positive,
                      self.false_negative + other.false_negative)


def counts(prediction: np.ndarray, truth: np.ndarray) -> Counts:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    return Counts(int(np.count_nonzero(prediction & truth)), int(np.count_nonzero(prediction & ~truth)),
                  int(np.count_nonzero(~prediction & truth)))


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def overlap_metrics(c: Counts) -> dict[str, float]:
    """Dice, IoU, precision, recall from counts. An empty denominator scores 1.0 (nothing to get wrong),
    except precision of an empty prediction, which is 0.0 when the truth is not empty."""
    tp, fp, fn = c.true_positive, c.false_positive, c.false_negative
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp) if tp + fp else (1.0 if fn == 0 else 0.0),
        "recall": _ratio(tp, tp + fn),
    }


def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels that touch the background (4-connectivity); the image edge counts as background."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, structure=_CROSS, border_value=0)


@dataclass
class SurfaceDistances:
    """Distances (mm) from each predicted boundary pixel to the true boundary, and the reverse."""

    prediction_to_truth: np.ndarray
    truth_to_prediction: np.ndarray

    def __add__(self, other: "SurfaceDistances") -> "SurfaceDistances":
        return SurfaceDistances(np.concatenate([self.prediction_to_truth, other.prediction_to_truth]),
                                np.concatenate([self.truth_to_prediction, other.truth_to_prediction]))


def surface_distances(prediction: np.ndarray, truth: np.ndarray, spacing_mm: tuple[float, float]) -> SurfaceDistances:
    """Boundary-to-boundary distances; a boundary with no counterpart gets the image diagonal in mm."""
    predicted_edge, true_edge = boundary(prediction), boundary(truth)
    diagonal = float(np.hypot(prediction.shape[0] * spacing_mm[0], prediction.shape[1] * spacing_mm[1]))

    def distances_to(edge_from: np.ndarray, edge_to: np.ndarray) -> np.ndarray:
        if not edge_from.any():
            return np.empty(0, dtype=np.float32)
        if not edge_to.any():
            return np.full(int(edge_from.sum()), diagonal, dtype=np.float32)
        field = ndimage.distance_transform_edt(~edge_to, sampling=spacing_mm)
        return field[edge_from].astype(np.float32)

    return SurfaceDistances(distances_to(predicted_edge, true_edge), distances_to(true_edge, predicted_edge))


def surface_metrics(distances: SurfaceDistances, tolerance_mm: float, diagonal_mm: float) -> dict[str, float]:
    """Normalised surface Dice at ``tolerance_mm`` and HD95 (max of the two directed 95th percentiles)."""
    forward, backward = distances.prediction_to_truth, distances.truth_to_prediction
    total = forward.size + backward.size
    if total == 0:
        return {"nsd": 1.0, "hd95": 0.0}
    if forward.size == 0 or backward.size == 0:
        return {"nsd": 0.0, "hd95": diagonal_mm}
    within = int(np.count_nonzero(forward <= tolerance_mm) + np.count_nonzero(backward <= tolerance_mm))
    hd95 = max(float(np.percentile(forward, 95)), float(np.percentile(backward, 95)))
    return {"nsd": within / total, "hd95": hd95}
