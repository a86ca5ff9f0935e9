"""Tiny labelled slices for training tests, written as the .npz that ``prepare`` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidseg_training.data import INFECTION, LUNG, SliceDataset


def write_labelled_slices(path: Path, labels: np.ndarray | None = None, slices: int = 12) -> Path:
    """``slices`` (a multiple of 6; 12 unless given) random 64 x 64 slices of 6 cases, each with a lung square
    holding an infection square (or ``labels``, slices x 64 x 64), as the .npz that ``prepare`` writes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (slices, 64, 64), dtype=np.uint8)
    if labels is None:
        labels = np.zeros((slices, 64, 64), dtype=np.uint8)
        labels[:, 20:40, 10:30] = LUNG
        labels[:, 25:30, 15:20] = INFECTION
    SliceDataset(images, labels, np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), slices // 6)).save(path)
    return path
