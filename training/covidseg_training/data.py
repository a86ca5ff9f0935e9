"""Training data: the shared PNG export of Ma et al. 2020, and patient-grouped folds."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKGROUND, LUNG, INFECTION = 0, 1, 2
# A training-only label: lung whose infection state is not known (the lungs of negative scans when
# the config leaves infection inside them unsupervised). The loss accepts lung or infection there.
LUNG_UNKNOWN = 3
DEFAULT_PNG_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ma2020-covid19-ct-png"


@dataclass
class SliceDataset:
    """Network-ready slices: ``images`` uint8 (N, H, W) after the recipe, ``labels`` uint8 (N, H, W)
    with 0 background, 1 lung, 2 infection; ``cases`` the patient id of each slice; ``pixel_mm`` the
    in-plane size in mm of a pixel of each slice as stored (after padding and resizing), or None where
    the source dropped it (the PNG export)."""

    images: np.ndarray
    labels: np.ndarray
    cases: np.ndarray
    pixel_mm: np.ndarray | None = None

    def subset(self, mask: np.ndarray) -> "SliceDataset":
        pixel_mm = None if self.pixel_mm is None else self.pixel_mm[mask]
        return SliceDataset(self.images[mask], self.labels[mask], self.cases[mask], pixel_mm)

    def pixel_sizes(self, assumed_mm: float) -> np.ndarray:
        """Each slice's pixel size in mm: its own where the data has one, else ``assumed_mm``."""
        if self.pixel_mm is not None:
            return np.asarray(self.pixel_mm, dtype=float)
        return np.full(len(self.images), assumed_mm, dtype=float)

    def save(self, path: Path) -> None:
        extra = {} if self.pixel_mm is None else {"pixel_mm": self.pixel_mm}
        np.savez_compressed(path, images=self.images, labels=self.labels, cases=self.cases, **extra)

    @classmethod
    def load(cls, path: Path) -> "SliceDataset":
        """The slices ``prepare`` wrote to ``path``; a FileNotFoundError that says how to make them if none."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no prepared slices at {path} (python -m covidseg_training prepare writes them)")
        with np.load(path) as data:
            pixel_mm = data["pixel_mm"].astype(np.float32) if "pixel_mm" in data.files else None
            return cls(data["images"], data["labels"], data["cases"].astype(str), pixel_mm)


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


def slice_neighbours(dataset: SliceDataset, min_lung_dice: float = 0.9) -> np.ndarray:
    """For each slice, the index of the slice above and below it in its volume, or -1 where there is none
    in the data: (N, 2) int, columns previous and next.

    The PNG export numbered each volume's slices in order but dropped those without infection, so two
    consecutive slices of one case are taken as neighbours only where their lung labels overlap with a
    Dice of at least ``min_lung_dice`` (a dropped run of slices changes the lungs' outline; a single
    dropped thin slice may not, so a neighbour can lie a few millimetres further away than the next
    slice of the volume)."""
    lungs = dataset.labels > 0
    count = len(lungs)
    neighbours = np.full((count, 2), -1, dtype=np.int64)
    for index in range(count - 1):
        if dataset.cases[index] != dataset.cases[index + 1]:
            continue
        a, b = lungs[index], lungs[index + 1]
        total = int(a.sum()) + int(b.sum())
        if total and 2 * int(np.count_nonzero(a & b)) >= min_lung_dice * total:
            neighbours[index, 1] = index + 1
            neighbours[index + 1, 0] = index
    return neighbours


def context_stacks(images: np.ndarray, neighbours: np.ndarray, context_slices: int) -> np.ndarray:
    """Each slice with ``context_slices`` neighbours on each side as channels, lowest first (uint8 (N,
    2k+1, H, W)); ``neighbours`` is :func:`slice_neighbours`' table, followed k times for the k-th
    neighbour. Where a volume's known slices end, the last one stands in, as the engine repeats a
    volume's end slices."""
    count = len(images)
    chosen = np.empty((count, 2 * context_slices + 1), dtype=np.int64)
    chosen[:, context_slices] = np.arange(count)
    for step in range(1, context_slices + 1):
        for column, side in ((context_slices - step, 0), (context_slices + step, 1)):
            nearer = chosen[:, column + 1] if side == 0 else chosen[:, column - 1]
            further = neighbours[nearer, side]
            chosen[:, column] = np.where(further >= 0, further, nearer)
    return images[chosen]


def with_context(dataset: SliceDataset, context_slices: int, images: np.ndarray | None = None) -> np.ndarray:
    """A dataset's network inputs: its images (or ``images``, e.g. a degraded copy of them), each with
    ``context_slices`` neighbours in the data on each side as channels (:func:`context_stacks`)."""
    images = dataset.images if images is None else images
    if not context_slices:
        return images
    return context_stacks(images, slice_neighbours(dataset), context_slices)


# Volumes of one patient, by case id, that neither the PNG export's cases.csv nor the ids say.
# Export cases 11 and 12: their best-matching CT slices correlate 0.97 (at 48 x 48 pixels), where
# every other pair of cases stays at or under 0.87; two series of one Radiopaedia study, like the
# record's radiopaedia_10_85902_1 and _3 (tests/test_training_folds.py measures it).
PNG_EXPORT_SAME_PATIENT = {"12": "11"}
RADIOPAEDIA_VOLUME = re.compile(r"(radiopaedia_\d+)_\d+_\d+")


def patient_of(case: str) -> str:
    """The patient a volume belongs to. The record's Radiopaedia volumes are named
    ``radiopaedia_<case>_<study>_<series>``, and one Radiopaedia case is one patient (case 10 has two
    series, case 29 two studies); the PNG export's case ids are per volume (PNG_EXPORT_SAME_PATIENT)."""
    case = str(case)
    radiopaedia = RADIOPAEDIA_VOLUME.fullmatch(case)
    if radiopaedia:
        return radiopaedia.group(1)
    return PNG_EXPORT_SAME_PATIENT.get(case, case)


def patient_folds(cases: np.ndarray, n_folds: int, seed: int = 0) -> np.ndarray:
    """Assign every slice a fold so that no patient spans two folds and folds hold similar slice counts.

    Greedy over volumes (``cases``): in decreasing size (ties broken by a seeded shuffle), each goes to
    the emptiest fold; then the other volumes of a patient with several (:func:`patient_of`) join the
    fold of its largest volume. Grouping in that second step, rather than in the greedy one, moves
    only those volumes: folds without them stay as they were before the grouping was known.
    """
    unique, counts = np.unique(cases, return_counts=True)
    if len({patient_of(case) for case in unique}) < n_folds:
        raise ValueError(f"{len(unique)} volumes of fewer than {n_folds} patients cannot fill {n_folds} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_sizes = np.zeros(n_folds, dtype=int)
    fold_of_case: dict[str, int] = {}
    for position in order:
        fold = int(np.argmin(fold_sizes))
        fold_of_case[unique[position]] = fold
        fold_sizes[fold] += counts[position]
    largest_volume: dict[str, str] = {}
    for position in order:  # decreasing size: the first volume seen of a patient is its largest
        largest_volume.setdefault(patient_of(unique[position]), unique[position])
    for case in unique:
        fold_of_case[case] = fold_of_case[largest_volume[patient_of(case)]]
    return np.array([fold_of_case[case] for case in cases])
