"""Does the model call healthy lung infected? As is, and on slices degraded to a coarse scanner resolution.

Healthy lung = pixels the truth labels lung but not infection. The score is the fraction of them
predicted as infection (target: under 5%), pooled over the fold and as a mean over cases.
The degradation mimics a 3 mm in-plane reconstruction: downsample by 3 mm / pixel size (area
averaging), upsample back bicubic, then re-apply the recipe's min-max + CLAHE (engine code).

    python -m covidseg_training robustness --checkpoint runs/v1/fold0/best.pt --out eval/ [--config X.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import cv2
import numpy as np
import torch
from CovidInfectionSegLib.atomic import write_text_atomic
from CovidInfectionSegLib.preprocessing import (
    IntensityRecipe,
    make_clahe,
    minmax_to_uint8,
)

from .data import INFECTION, LUNG, SliceDataset
from .model_and_data import (
    DEFAULT_PIXEL_MM,
    add_model_arguments,
    resolve_model_and_data,
)
from .predict import Predictions, predict_dataset

DEGRADED_PIXEL_MM = 3.0
TARGET_FALSE_POSITIVE = 0.05


def degrade_resolution(images: np.ndarray, pixel_mm: float | np.ndarray, target_mm: float = DEGRADED_PIXEL_MM,
                       recipe: IntensityRecipe | None = None) -> np.ndarray:
    """uint8 slices (N, H, W) as a ``target_mm`` reconstruction would look after the intensity recipe.
    ``pixel_mm``: one pixel size for all slices or one per slice."""
    pixel_sizes = np.broadcast_to(np.asarray(pixel_mm, dtype=float), (len(images),))
    if len(images) and target_mm <= pixel_sizes.max():
        raise ValueError(f"target resolution {target_mm} mm is not coarser than the pixel size {pixel_sizes.max()} mm")
    rows, cols = images.shape[1:]
    clahe = make_clahe(recipe or IntensityRecipe(input_size=rows))
    out = np.empty_like(images)
    for index, image in enumerate(images):
        factor = target_mm / pixel_sizes[index]
        small_size = (max(2, round(cols / factor)), max(2, round(rows / factor)))
        small = cv2.resize(image.astype(np.float32), small_size, interpolation=cv2.INTER_AREA)
        restored = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_CUBIC)
        out[index] = clahe.apply(minmax_to_uint8(restored))
    return out


def healthy_lung_called_infection(predicted: np.ndarray, truth: np.ndarray, cases: np.ndarray) -> dict[str, Any]:
    """Fraction of truly healthy lung pixels predicted as infection: pooled, per case, mean and sd over cases."""
    healthy = truth == LUNG
    called = (predicted == INFECTION) & healthy
    per_case = {}
    for case in np.unique(cases):
        selection = cases == case
        n_healthy = int(healthy[selection].sum())
        per_case[str(case)] = float(called[selection].sum() / n_healthy) if n_healthy else 0.0
    values = np.array(list(per_case.values()))
    return {
        "pooled": float(called.sum() / max(1, healthy.sum())),
        "case_mean": float(values.mean()),
        "case_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "case_max": float(values.max()),
        "per_case": per_case,
        "healthy_lung_pixels": int(healthy.sum()),
    }


def infection_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    prediction, reference = predicted == INFECTION, truth == INFECTION
    denominator = int(prediction.sum() + reference.sum())
    return 1.0 if denominator == 0 else float(2 * (prediction & reference).sum() / denominator)


def robustness_report(network: torch.nn.Module, dataset: SliceDataset, pixel_mm: float | np.ndarray,
                      as_is: Predictions | None = None, batch_size: int = 16,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Healthy-lung false positives as is and at :data:`DEGRADED_PIXEL_MM`, with the pass/fail verdict
    (the network run on ``device``)."""
    as_is = as_is or predict_dataset(network, dataset, batch_size, device=device)
    degraded = predict_dataset(network, dataset, batch_size, degrade_resolution(dataset.images, pixel_mm), device)
    sizes = np.asarray(pixel_mm, dtype=float)
    report: dict[str, Any] = {"target_below": TARGET_FALSE_POSITIVE,
                              "pixel_mm": float(sizes) if sizes.ndim == 0 else [float(sizes.min()), float(sizes.max())],
                              "degraded_pixel_mm": DEGRADED_PIXEL_MM}
    for name, predictions in (("as_is", as_is), ("degraded", degraded)):
        result = healthy_lung_called_infection(predictions.labels, dataset.labels, dataset.cases)
        result["infection_dice_pooled"] = infection_dice(predictions.labels, dataset.labels)
        result["meets_target"] = result["pooled"] < TARGET_FALSE_POSITIVE
        report[name] = result
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM,
                        help="in-plane pixel size in mm assumed for data without one, like the PNG export")
    args = parser.parse_args(argv)
    network, dataset, meta = resolve_model_and_data(args)
    report = {**meta, **robustness_report(network, dataset, dataset.pixel_sizes(args.pixel_mm),
                                          batch_size=args.batch_size)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "robustness.json", json.dumps(report, indent=2) + "\n")
    for name in ("as_is", "degraded"):
        print(f"{name}: {100 * report[name]['pooled']:.2f}% of healthy lung called infection "
              f"({'meets' if report[name]['meets_target'] else 'MISSES'} the <5% target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
