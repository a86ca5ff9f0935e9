"""Training data: the shared PNG export of Ma et al. 2020, and patient-grouped folds."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKGROUND, LUNG, INFECTION = 0, 1, 2
DEFAULT_PNG_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ma2020-covid19-ct-png"


@dataclass
class SliceDataset:
    """Network-ready slices: ``images`` uint8 (N, H, W) after the recipe, ``labels`` uint8 (N, H, W)
    with 0 background, 1 lung, 2 infection; ``cases`` the patient id of each slice."""

    images: np.ndarray
    labels: np.ndarray
    cases: np.ndarray

    def subset(self, mask: np.ndarray) -> "SliceDataset":
        return SliceDataset(self.images[mask], self.labels[mask], self.cases[mask])

    def save(self, path: Path) -> None:
        np.savez_compressed(path, images=self.images, labels=self.labels, cases=self.cases)

    @classmethod
    def load(cls, path: Path) -> "SliceDataset":
        with np.load(path) as data:
            return cls(data["images"], data["labels"], data["cases"].astype(str))


def labels_from_masks(lungs: np.ndarray, infection: np.ndarray) -> np.ndarray:
    """Merge binary masks into one label map; infection wins and also counts as lung."""
    labels = np.zeros(lungs.shape, dtype=np.uint8)
    labels[lungs > 0] = LUNG
    labels[infection > 0] = INFECTION
    return labels


def load_png_export(root: Path = DEFAULT_PNG_ROOT) -> SliceDataset:
    """Read the shared PNG export (ct/, lungs/, infection/, cases.csv). Its recipe is already applied."""
    root = Path(root)
    index = root / "cases.csv"
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: expected the Ma et al. 2020 PNG export (see its README)")
    with index.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    images, labels, cases = [], [], []
    for row in rows:
        name = f"{row['slice']}.png"
        image = cv2.imread(str(root / "ct" / name), cv2.IMREAD_GRAYSCALE)
        lungs = cv2.imread(str(root / "lungs" / name), cv2.IMREAD_GRAYSCALE)
        infection = cv2.imread(str(root / "infection" / name), cv2.IMREAD_GRAYSCALE)
        if image is None or lungs is None or infection is None:
            raise FileNotFoundError(f"slice {name} is missing from {root}/ct, lungs or infection")
        images.append(image)
        labels.append(labels_from_masks(lungs, infection))
        cases.append(row["case"])
    return SliceDataset(np.stack(images), np.stack(labels), np.array(cases))


def patient_folds(cases: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Assign every slice a fold so that no patient spans two folds and folds hold similar slice counts.

    Greedy: patients in decreasing size (ties broken by a seeded shuffle) go to the emptiest fold.
    """
    unique, counts = np.unique(cases, return_counts=True)
    if len(unique) < n_folds:
        raise ValueError(f"{len(unique)} patients cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_sizes = np.zeros(n_folds, dtype=int)
    fold_of_case: dict[str, int] = {}
    for position in order:
        fold = int(np.argmin(fold_sizes))
        fold_of_case[unique[position]] = fold
        fold_sizes[fold] += counts[position]
    return np.array([fold_of_case[case] for case in cases])
