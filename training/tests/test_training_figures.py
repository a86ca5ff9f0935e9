"""The evaluation's example-slices figure: which slices it picks, and that it draws the labels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from covidseg_training.data import INFECTION, LUNG
from covidseg_training.figures import INFECTION_COLOUR, example_slices, plot_examples


def rows_with_scores(scores: list[float]) -> list[dict]:
    return [{"slice": index, "case": f"{index % 3:02d}", "infection_dice": score, "lung_dice": 0.97}
            for index, score in enumerate(scores)]


def test_example_slices_run_from_worst_to_best():
    rows = rows_with_scores([0.5, 0.9, 0.1, 0.7, 0.3])
    chosen = example_slices(rows)
    assert [name for name, _ in chosen] == ["worst", "lower quartile", "median", "best"]
    assert [row["infection_dice"] for _, row in chosen] == [0.1, 0.3, 0.5, 0.9]
    assert example_slices(rows_with_scores([0.4]))[0][1]["slice"] == 0  # one slice fills every row


def red_pixels(path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return int(np.count_nonzero((red - green > 40) & (red - blue > 40)))


def test_plot_examples_fills_infection_in_its_colour(tmp_path):
    images = np.full((5, 64, 64), 60, np.uint8)
    lungs_only = np.zeros((5, 64, 64), np.uint8)
    lungs_only[:, 16:48, 10:30] = LUNG
    infected = lungs_only.copy()
    infected[:, 20:30, 12:20] = INFECTION
    rows = rows_with_scores([0.5, 0.9, 0.1, 0.7, 0.3])

    plot_examples(images, infected, infected, rows, tmp_path / "infected.png")
    plot_examples(images, lungs_only, lungs_only, rows, tmp_path / "lungs.png")

    size = Image.open(tmp_path / "infected.png").size
    assert size[1] > size[0], "four rows of three panels: taller than wide"
    assert INFECTION_COLOUR[0] > INFECTION_COLOUR[1] + 0.3  # a red-dominant colour, so the check below means it
    assert red_pixels(tmp_path / "infected.png") > 100
    assert red_pixels(tmp_path / "lungs.png") == 0
