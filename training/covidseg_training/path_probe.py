"""Can a small classifier tell the two data paths apart? (A shortcut the segmentation net could learn.)

The labelled positives exist only as the PNG export (made by another program, from other scanners);
the negatives come from HU volumes through the engine. If non-infected lung of one path looks
different from non-infected lung of the other, a network trained on both can learn "this look means
no infection" instead of what infection looks like, and lose infection on real scans read through
the engine. This probe measures that gap directly:

- patches of ``PATCH`` x ``PATCH`` pixels (at the network's 256 x 256), entirely non-infected lung
  (at least 95% lung, no infection within ``INFECTION_MARGIN`` pixels), from mid-lung slices of both
  paths (PNG export: all its slices are mid-lung; negatives: levels 0.2 to 0.8 of the lung extent);
- a small CNN trained to say which path a patch came from, on one half of the patients of each path
  and tested on the other half, then the halves swapped (for the negatives: one LIDC scan each);
- the held-out ROC AUC, 0.5 when the paths cannot be told apart, 1.0 when they always can.

``--augment`` passes every slice through the training augmentation first (what the segmentation
network actually sees): ``AugmentConfig()``'s defaults, or with ``--augment-config CONFIG`` the
augmentation of that experiment YAML (for example v2's, which adds the kernel augmentation). Then a classifier trained on all patches of both paths says which path the
lung of other real scans read through the engine looks like (default: the COVID-19 scan and the two
kernels of the chest CT that the whole-scan checks use; ``--score SCAN ...`` picks others,
``--no-score`` skips this).

    python -m covidseg_training path_probe [--augment | --augment-config CONFIG] [--score SCAN ... | --no-score]
                                           [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from CovidInfectionSegLib.atomic import write_text_atomic
from CovidInfectionSegLib.preprocessing import IntensityRecipe

from .augment import AugmentConfig, SliceAugmenter
from .config import TrainConfig
from .data import INFECTION, LUNG, SliceDataset, load_png_export, patient_folds
from .negatives import NegativesConfig, load_negatives

PATCH = 32
INFECTION_MARGIN = 8
# Patches per slice: the export has 1614 slices, a negative scan about 70 mid-lung ones, so that
# each path gives the classifier a few thousand patches.
PATCHES_PER_SLICE = {"png_export": 2, "scan": 16}
MID_LUNG = (0.2, 0.8)
# Real scans read through the engine that no training run uses (the whole-scan checks).
CHECK_SCANS = ("covid-chest-ct/MIDRC-RICORD-1A-419639-001012.nii.gz", "example-chest-ct/Lung_Dx-A0001_kernel-L.nii.gz",
               "example-chest-ct/Lung_Dx-A0001_kernel-B.nii.gz")


def lung_patches(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                 per_slice: int = PATCHES_PER_SLICE["png_export"], size: int = PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``per_slice`` random patches per slice that are non-infected lung; returns the patches
    and the index of the slice each came from."""
    patches, origin = [], []
    for index, (image, label) in enumerate(zip(images, labels)):
        infection = ndimage.binary_dilation(label == INFECTION, iterations=INFECTION_MARGIN)
        healthy = ((label == LUNG) & ~infection).astype(np.float32)
        coverage = ndimage.uniform_filter(healthy, size=size, mode="constant")
        half = size // 2
        valid = np.argwhere(coverage[half:-half, half:-half] >= 0.95) + half
        if not len(valid):
            continue
        for y, x in valid[rng.permutation(len(valid))[:per_slice]]:
            patches.append(image[y - half : y + half, x - half : x + half])
            origin.append(index)
    if not patches:
        return np.zeros((0, size, size), np.uint8), np.zeros(0, int)
    return np.stack(patches), np.asarray(origin)


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    truth = truth.astype(bool)
    ranks = _average_ranks(scores)
    positives, negatives = truth.sum(), (~truth).sum()
    if not positives or not negatives:
        return float("nan")
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    ranks[order] = np.arange(1, len(values) + 1)
    sorted_values = values[order]
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    for start, stop in zip(np.r_[0, boundaries], np.r_[boundaries, len(values)]):
        if stop - start > 1:
            ranks[order[start:stop]] = ranks[order[start:stop]].mean()
    return ranks


def small_classifier() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 1))


def train_classifier(train_x: np.ndarray, train_y: np.ndarray, epochs: int = 4, seed: int = 0) -> nn.Module:
    """:func:`small_classifier` trained on balanced batches of patches (label 1: the negative-scan path)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = small_classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    by_class = [np.flatnonzero(train_y == c) for c in (0, 1)]
    steps = max(by_class[0].size, by_class[1].size) // 32
    for _ in range(epochs):
        model.train()
        for _ in range(steps):
            batch = np.concatenate([rng.choice(indices, 32) for indices in by_class])
            x = torch.from_numpy(train_x[batch]).float().div(255).unsqueeze(1)
            y = torch.from_numpy(train_y[batch]).float()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def negative_path_probability(model: nn.Module, patches: np.ndarray) -> np.ndarray:
    """The classifier's probability that each patch comes from the negative-scan path."""
    with torch.inference_mode():
        logits = [model(torch.from_numpy(patches[i : i + 256]).float().div(255).unsqueeze(1)).squeeze(1)
                  for i in range(0, len(patches), 256)]
    return torch.sigmoid(torch.cat(logits)).numpy() if logits else np.zeros(0)


def train_and_score(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                    epochs: int = 4, seed: int = 0) -> float:
    """Held-out AUC of :func:`small_classifier` trained on balanced batches of the training patches."""
    model = train_classifier(train_x, train_y, epochs, seed)
    return roc_auc(negative_path_probability(model, test_x), test_y)


def score_other_scans(positives: SliceDataset, negatives: list[SliceDataset], others: dict[str, SliceDataset],
                      epochs: int = 4, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train on all patches of both paths, then say which path the lung of other scans looks like:
    for each, the mean probability of "negative-scan path" over its mid-lung patches and the share
    above 0.5. A scan read through the engine that looks like the negatives (near 1) is one where a
    network trained with "no infection" on the negatives' lungs could learn to see no infection."""
    rng = np.random.default_rng(seed)
    positive_patches = lung_patches(positives.images, positives.labels, rng)[0]
    negative_patches = np.concatenate([lung_patches(n.images, n.labels, rng, PATCHES_PER_SLICE["scan"])[0]
                                       for n in negatives])
    model = train_classifier(np.concatenate([positive_patches, negative_patches]),
                             np.r_[np.zeros(len(positive_patches)), np.ones(len(negative_patches))], epochs, seed)
    result = {}
    for name, dataset in others.items():
        patches = lung_patches(dataset.images, dataset.labels, rng, PATCHES_PER_SLICE["scan"])[0]
        probability = negative_path_probability(model, patches)
        result[name] = {"patches": int(len(probability)),
                        "mean_negative_path_probability": float(probability.mean()) if len(probability) else float("nan"),
                        "share_above_half": float((probability > 0.5).mean()) if len(probability) else float("nan")}
    return result


def augmented(dataset: SliceDataset, seed: int, config: AugmentConfig, negative: bool = False) -> SliceDataset:
    """Every slice once through the training augmentation ``config`` (geometry and scanner variation), as a
    whole-scan negative's slice when ``negative`` (what only negatives get: ``mass_on``, ``harmonise_on``, gas)."""
    augmenter = SliceAugmenter(config, IntensityRecipe(), seed=seed)
    pairs = [augmenter(image, label, negative=negative) for image, label in zip(dataset.images, dataset.labels)]
    return SliceDataset(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), dataset.cases)


def augmented_paths(positives: SliceDataset, negatives: list[SliceDataset], seed: int,
                    augment: AugmentConfig) -> tuple[SliceDataset, list[SliceDataset]]:
    """Both paths through the training augmentation ``augment``, each slice drawn from ``seed``."""
    return augmented(positives, seed, augment), [augmented(n, seed + 1 + i, augment, negative=True)
                                                 for i, n in enumerate(negatives)]


def probe(positives: SliceDataset, negatives: list[SliceDataset], augment: AugmentConfig | None = None,
          seed: int = 0, epochs: int = 4) -> dict:
    """The held-out AUC of the path classifier, for each of the two swaps and their mean; with
    ``augment`` every slice passes through that training augmentation first."""
    rng = np.random.default_rng(seed)
    if augment is not None:
        positives, negatives = augmented_paths(positives, negatives, seed, augment)
    halves = patient_folds(positives.cases, 2, seed)
    positive_patches = [lung_patches(positives.images[halves == h], positives.labels[halves == h], rng)[0]
                        for h in (0, 1)]
    negative_patches = [lung_patches(n.images, n.labels, rng, PATCHES_PER_SLICE["scan"])[0] for n in negatives]
    aucs = []
    for train_half in (0, 1):
        test_half = 1 - train_half
        train_x = np.concatenate([positive_patches[train_half], negative_patches[train_half]])
        train_y = np.r_[np.zeros(len(positive_patches[train_half])), np.ones(len(negative_patches[train_half]))]
        test_x = np.concatenate([positive_patches[test_half], negative_patches[test_half]])
        test_y = np.r_[np.zeros(len(positive_patches[test_half])), np.ones(len(negative_patches[test_half]))]
        aucs.append(train_and_score(train_x, train_y, test_x, test_y, epochs, seed))
    return {"auc": float(np.mean(aucs)), "auc_per_swap": aucs,
            "augment": None if augment is None else asdict(augment),
            "patches": {"png_export": [len(p) for p in positive_patches],
                        "negatives": [len(p) for p in negative_patches]}}


def mid_lung(scan) -> SliceDataset:
    levels = np.nan_to_num(scan.levels, nan=-1.0)
    return scan.slices.subset((levels >= MID_LUNG[0]) & (levels <= MID_LUNG[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", default="", help="PNG export folder (default: the shared one)")
    parser.add_argument("--augment", action="store_true",
                        help="probe what training shows: slices augmented first (AugmentConfig defaults)")
    parser.add_argument("--augment-config", type=Path, metavar="CONFIG",
                        help="like --augment, with the augmentation of this experiment YAML")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default="data/cache", help="folder for the negatives' prepared slices")
    parser.add_argument("--score", nargs="*", metavar="SCAN",
                        help="other scans (paths under ../shared/data or absolute) whose lung is scored by a "
                             "classifier trained on all patches of both paths (default, also for a bare --score: "
                             "the whole-scan checks)")
    parser.add_argument("--no-score", action="store_true", help="only the held-out AUC, no other scans scored")
    parser.add_argument("--out", help="write the result as JSON here")
    args = parser.parse_args(argv)
    augment = None
    if args.augment_config:
        augment = TrainConfig.load(args.augment_config).augment
    elif args.augment:
        augment = AugmentConfig()
    positives = load_png_export(Path(args.png)) if args.png else load_png_export()
    config = NegativesConfig()
    scans = load_negatives(config, IntensityRecipe(), ["LIDC-IDRI-0001", "LIDC-IDRI-0003"], Path(args.cache))
    negatives = [mid_lung(scan) for scan in scans]
    if augment is not None:  # once, for the probe and for scoring the other scans
        positives, negatives = augmented_paths(positives, negatives, args.seed, augment)
    result = probe(positives, negatives, seed=args.seed, epochs=args.epochs)
    result["augment"] = None if augment is None else asdict(augment)
    score_scans = [] if args.no_score else (args.score or list(CHECK_SCANS))
    if score_scans:
        others = {name: mid_lung(scan) for name, scan in
                  zip(score_scans, load_negatives(config, IntensityRecipe(), score_scans, Path(args.cache)))}
        if augment is not None:
            others = {name: augmented(dataset, args.seed + 10 + i, augment)
                      for i, (name, dataset) in enumerate(others.items())}
        result["other_scans"] = score_other_scans(positives, negatives, others, args.epochs, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        write_text_atomic(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
