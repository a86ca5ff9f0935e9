"""Evaluate a checkpoint or an exported model package on the validation fold of a config.

    python -m covidseg_training evaluate --checkpoint runs/v1/fold0/best.pt --out runs/v1/fold0/eval
    python -m covidseg_training evaluate --checkpoint runs/gpu/packages/covid_unet_v2_dense_fold1.json \\
        --config configs/v2_dense.yaml --fold 1 --out eval_package [--pixel-mm 1.37] [--no-robustness]

Writes to ``--out``: per_slice.csv, per_case.csv (Dice, IoU, precision, recall, NSD, HD95 for lung
and infection), threshold_sweep.csv + .png (infection probability threshold), pr_curve.csv + .png,
boxplot.png, examples.png (worst to best slices, with overlays), robustness.json and
summary.json (mean and sd over slices and over cases, pooled counts).

The slices are 2D. Surface metrics use each slice's pixel size where the data has it (``prepare
--zenodo`` stores it from the volumes' spacing); the PNG export dropped it, so for it they assume
``--pixel-mm`` (default 350 mm field of view / 256 px = 1.37 mm). Tolerances follow the Ma et
al. benchmark: 1 mm for lungs, 3 mm for infection. Per-case surface metrics pool the 2D boundary
distances of the case's slices (the slices are not contiguous, so no 3D surface exists).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from CovidInfectionSegLib.atomic import write_text_atomic

from .data import INFECTION, LUNG, SliceDataset
from .figures import plot_boxplot, plot_curves, plot_examples
from .metrics import (
    Counts,
    SurfaceDistances,
    counts,
    overlap_metrics,
    surface_distances,
    surface_metrics,
)
from .model_and_data import (
    DEFAULT_PIXEL_MM,
    add_model_arguments,
    resolve_model_and_data,
)
from .predict import Predictions, predict_dataset
from .robustness import robustness_report

TOLERANCE_MM = {"lung": 1.0, "infection": 3.0}
STRUCTURES = ("lung", "infection")
METRICS = ("dice", "iou", "precision", "recall", "nsd", "hd95")
THRESHOLDS = tuple(round(value, 2) for value in np.arange(0.05, 1.0, 0.05))
PR_BINS = 1000


def structure_mask(labels: np.ndarray, structure: str) -> np.ndarray:
    """Lung = lung or infection (infection lies inside the lung); infection = infection."""
    return labels >= LUNG if structure == "lung" else labels == INFECTION


def _scores(c: Counts, distances: SurfaceDistances, structure: str, diagonal_mm: float) -> dict[str, float]:
    return {**overlap_metrics(c), **surface_metrics(distances, TOLERANCE_MM[structure], diagonal_mm)}


def pixel_note(dataset: SliceDataset, assumed_mm: float) -> str:
    if dataset.pixel_mm is not None:
        sizes = np.asarray(dataset.pixel_mm, dtype=float)
        return (f"in-plane pixel size of each slice from its volume's spacing: {sizes.min():.3f}-{sizes.max():.3f} mm "
                f"(median {np.median(sizes):.3f})")
    return (f"in-plane pixel size unknown (the PNG export dropped it); assumed {assumed_mm:.3f} mm, "
            f"i.e. a ~{assumed_mm * dataset.images.shape[-1]:.0f} mm field of view over {dataset.images.shape[-1]} px")


def metric_tables(predicted: np.ndarray, truth: np.ndarray, cases: np.ndarray,
                  pixel_mm: float | np.ndarray) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-slice rows and per-case rows (overlap from pooled counts, surface from pooled distances).
    ``pixel_mm``: one pixel size for all slices or one per slice."""
    pixel_sizes = np.broadcast_to(np.asarray(pixel_mm, dtype=float), (len(truth),))
    diagonal_px = float(np.hypot(*truth.shape[1:]))
    case_diagonal_mm: dict[str, float] = {}
    slice_rows: list[dict[str, Any]] = []
    pooled: dict[str, dict[str, tuple[Counts, SurfaceDistances]]] = {}
    empty = SurfaceDistances(np.empty(0, np.float32), np.empty(0, np.float32))
    for index in range(len(truth)):
        case = str(cases[index])
        row: dict[str, Any] = {"slice": index, "case": case}
        spacing = (float(pixel_sizes[index]),) * 2
        diagonal_mm = diagonal_px * spacing[0]
        case_diagonal_mm[case] = max(diagonal_mm, case_diagonal_mm.get(case, 0.0))
        case_pool = pooled.setdefault(case, {s: (Counts(), empty) for s in STRUCTURES})
        for structure in STRUCTURES:
            prediction = structure_mask(predicted[index], structure)
            reference = structure_mask(truth[index], structure)
            c = counts(prediction, reference)
            distances = surface_distances(prediction, reference, spacing)
            for metric, value in _scores(c, distances, structure, diagonal_mm).items():
                row[f"{structure}_{metric}"] = value
            total_counts, total_distances = case_pool[structure]
            case_pool[structure] = (total_counts + c, total_distances + distances)
        slice_rows.append(row)
    case_rows = []
    for case, by_structure in pooled.items():
        row = {"case": case, "slices": int((cases == case).sum())}
        for structure, (c, distances) in by_structure.items():
            for metric, value in _scores(c, distances, structure, case_diagonal_mm[case]).items():
                row[f"{structure}_{metric}"] = value
        case_rows.append(row)
    return slice_rows, case_rows


def describe(values: Iterable[float]) -> dict[str, float]:
    array = np.asarray(list(values), dtype=float)
    return {
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "median": float(np.median(array)),
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{structure: {metric: {mean, sd, median, min, max, n}}} over the rows."""
    return {s: {m: describe(row[f"{s}_{m}"] for row in rows) for m in METRICS} for s in STRUCTURES}


def threshold_sweep(probability: np.ndarray, truth: np.ndarray, cases: np.ndarray) -> list[dict[str, float]]:
    """Infection called where its probability >= t: pooled Dice/precision/recall, mean case Dice,
    and the fraction of healthy lung called infection, for each t in :data:`THRESHOLDS`."""
    reference = truth == INFECTION
    healthy = truth == LUNG
    case_masks = [cases == case for case in np.unique(cases)]
    rows = []
    for threshold in THRESHOLDS:
        prediction = probability >= threshold
        pooled = overlap_metrics(counts(prediction, reference))
        case_dice = [overlap_metrics(counts(prediction[m], reference[m]))["dice"] for m in case_masks]
        rows.append({
            "threshold": threshold,
            "dice_pooled": pooled["dice"],
            "precision_pooled": pooled["precision"],
            "recall_pooled": pooled["recall"],
            "dice_case_mean": float(np.mean(case_dice)),
            "healthy_lung_called_infection": float((prediction & healthy).sum() / max(1, healthy.sum())),
        })
    return rows


def precision_recall_curve(probability: np.ndarray, truth: np.ndarray, bins: int = PR_BINS) -> tuple[list[dict[str, float]], float]:
    """Pixel-level precision/recall of infection at ``bins`` thresholds, and the average precision."""
    reference = (truth == INFECTION).ravel()
    index = np.minimum((probability.ravel().astype(np.float32) * bins).astype(np.int64), bins - 1)
    positives = np.bincount(index[reference], minlength=bins)
    negatives = np.bincount(index[~reference], minlength=bins)
    true_positive = np.cumsum(positives[::-1])[::-1]  # pixels with probability >= bin start
    false_positive = np.cumsum(negatives[::-1])[::-1]
    total_positive = max(1, int(reference.sum()))
    rows, average_precision, previous_recall = [], 0.0, 0.0
    for b in range(bins - 1, -1, -1):  # descending threshold = increasing recall
        called = int(true_positive[b] + false_positive[b])
        precision = true_positive[b] / called if called else 1.0
        recall = true_positive[b] / total_positive
        average_precision += (recall - previous_recall) * precision
        previous_recall = recall
        rows.append({"threshold": b / bins, "precision": float(precision), "recall": float(recall)})
    return rows, float(average_precision)


def table_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, table_csv(rows))


def evaluate(network: torch.nn.Module, dataset: SliceDataset, out_dir: str | Path, *,
             pixel_mm: float = DEFAULT_PIXEL_MM, robustness: bool = True, meta: dict[str, Any] | None = None,
             batch_size: int = 16, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``network`` over ``dataset`` (the validation fold) on ``device`` in float32, write every table and
    plot, return the summary."""
    if len(dataset.images) == 0:
        raise ValueError("the validation set is empty: nothing to evaluate")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions: Predictions = predict_dataset(network, dataset, batch_size, device=device)
    slice_mm = dataset.pixel_sizes(pixel_mm)
    slice_rows, case_rows = metric_tables(predictions.labels, dataset.labels, dataset.cases, slice_mm)
    sweep = threshold_sweep(predictions.infection_probability, dataset.labels, dataset.cases)
    pr_rows, average_precision = precision_recall_curve(predictions.infection_probability, dataset.labels)
    pooled = {s: overlap_metrics(counts(structure_mask(predictions.labels, s), structure_mask(dataset.labels, s)))
              for s in STRUCTURES}
    best = max(sweep, key=lambda row: row["dice_case_mean"])
    summary: dict[str, Any] = {
        **(meta or {}),
        "evaluated_on": "2D validation slices (middle 60% of each volume, only slices with infection), not whole volumes",
        "n_slices": int(len(dataset.images)),
        "n_cases": int(len(case_rows)),
        "cases": sorted(row["case"] for row in case_rows),
        "assumptions": {
            "pixel_mm": None if dataset.pixel_mm is not None else pixel_mm,  # None: each slice's own (pixel_note)
            "pixel_note": pixel_note(dataset, pixel_mm),
            "surface_tolerance_mm": TOLERANCE_MM,
            "lung": "lung + infection labels (infection lies inside the lung)",
            "per_case": "overlap from pooled pixel counts; NSD/HD95 from pooled 2D boundary distances",
            "empty_masks": "both empty: scores 1, HD95 0; one empty: 0, HD95 = image diagonal",
        },
        "per_case": summarise(case_rows),
        "per_slice": summarise(slice_rows),
        "pooled": pooled,
        "infection_average_precision": average_precision,
        "best_threshold": best,
    }
    write_table(out_dir / "per_slice.csv", slice_rows)
    write_table(out_dir / "per_case.csv", case_rows)
    write_table(out_dir / "threshold_sweep.csv", sweep)
    write_table(out_dir / "pr_curve.csv", pr_rows)
    plot_boxplot([("per case", case_rows), ("per slice", slice_rows)], out_dir / "boxplot.png")
    plot_curves(sweep, pr_rows, average_precision, out_dir / "pr_curve.png", out_dir / "threshold_sweep.png")
    plot_examples(dataset.images, dataset.labels, predictions.labels, slice_rows, out_dir / "examples.png")
    if robustness:
        report = robustness_report(network, dataset, slice_mm, as_is=predictions, batch_size=batch_size,
                                   device=device)
        write_text_atomic(out_dir / "robustness.json", json.dumps(report, indent=2) + "\n")
        summary["robustness"] = {name: {k: report[name][k] for k in ("pooled", "case_mean", "case_max", "meets_target",
                                                                     "infection_dice_pooled")}
                                 for name in ("as_is", "degraded")}
        summary["robustness"]["note"] = (f"fraction of healthy lung called infection, as is and after degrading to "
                                         f"{report['degraded_pixel_mm']} mm pixels; target < {report['target_below']}")
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM,
                        help=f"in-plane pixel size in mm assumed for data without one, like the PNG export "
                             f"(default {DEFAULT_PIXEL_MM:.3f})")
    parser.add_argument("--no-robustness", action="store_true", help="skip the healthy-lung / 3 mm check")
    args = parser.parse_args(argv)
    network, dataset, meta = resolve_model_and_data(args)
    summary = evaluate(network, dataset, args.out, pixel_mm=args.pixel_mm, robustness=not args.no_robustness,
                       meta=meta, batch_size=args.batch_size)
    print(format_summary(summary))
    print(f"wrote {args.out}/summary.json and tables")
    return 0


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines: per-case mean +- sd of the headline metrics."""
    lines = [f"fold {summary.get('fold')}: {summary['n_cases']} cases, {summary['n_slices']} slices"]
    for structure in STRUCTURES:
        stats = summary["per_case"][structure]
        lines.append(f"  {structure:9s} " + "  ".join(
            f"{m} {stats[m]['mean']:.3f}±{stats[m]['sd']:.3f}" for m in ("dice", "nsd", "hd95")))
    if "robustness" in summary:
        r = summary["robustness"]
        lines.append(f"  healthy lung called infection: {100 * r['as_is']['pooled']:.2f}% as is, "
                     f"{100 * r['degraded']['pooled']:.2f}% at 3 mm")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
