"""Metrics with hand-checkable answers: overlap, surface distances, PR curve, robustness scores."""

from __future__ import annotations

import numpy as np
import pytest

from covidseg_training.evaluate import metric_tables, precision_recall_curve, threshold_sweep
from covidseg_training.metrics import counts, overlap_metrics, surface_distances, surface_metrics
from covidseg_training.robustness import degrade_resolution, healthy_lung_called_infection


def square(offset: int = 0, size: int = 10, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[8 + offset : 8 + offset + size, 8 : 8 + size] = True
    return mask


def test_overlap_of_a_shifted_square():
    scores = overlap_metrics(counts(square(1), square()))
    # 90 of 100 pixels shared
    assert scores["dice"] == pytest.approx(0.9)
    assert scores["iou"] == pytest.approx(90 / 110)
    assert scores["precision"] == pytest.approx(0.9) and scores["recall"] == pytest.approx(0.9)


def test_empty_mask_conventions():
    empty = np.zeros((16, 16), bool)
    assert overlap_metrics(counts(empty, empty)) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    missed = overlap_metrics(counts(empty, square(shape=(32, 32))[:16, :16]))
    assert missed["dice"] == 0.0 and missed["precision"] == 0.0 and missed["recall"] == 0.0
    diagonal = float(np.hypot(32, 32))
    assert surface_metrics(surface_distances(empty, empty, (1, 1)), 1.0, diagonal) == {"nsd": 1.0, "hd95": 0.0}
    miss = surface_metrics(surface_distances(np.zeros((32, 32), bool), square(), (1, 1)), 1.0, diagonal)
    assert miss == {"nsd": 0.0, "hd95": diagonal}


def test_surface_metrics_respect_spacing_and_tolerance():
    identical = surface_metrics(surface_distances(square(), square(), (1.0, 1.0)), 1.0, 50)
    assert identical == {"nsd": 1.0, "hd95": 0.0}
    shifted = surface_distances(square(2), square(), (1.0, 1.0))  # top and bottom edges 2 px apart
    assert surface_metrics(shifted, 2.0, 50)["nsd"] == 1.0
    strict = surface_metrics(shifted, 1.0, 50)
    assert 0.0 < strict["nsd"] < 1.0
    assert strict["hd95"] == pytest.approx(2.0)
    # the same shift with 1.5 mm pixels is 3 mm
    assert surface_metrics(surface_distances(square(2), square(), (1.5, 1.5)), 1.0, 50)["hd95"] == pytest.approx(3.0)


def test_per_case_rows_pool_slices():
    truth = np.zeros((3, 32, 32), np.uint8)
    truth[:, 5:25, 5:25] = 1
    truth[:, 10:15, 10:15] = 2
    predicted = truth.copy()
    predicted[2] = 0  # misses everything on the last slice of case "b"
    slice_rows, case_rows = metric_tables(predicted, truth, np.array(["a", "b", "b"]), pixel_mm=1.0)
    assert [row["infection_dice"] for row in slice_rows] == [1.0, 1.0, 0.0]
    by_case = {row["case"]: row for row in case_rows}
    assert by_case["a"]["lung_dice"] == 1.0 and by_case["a"]["lung_hd95"] == 0.0
    assert by_case["b"]["lung_dice"] == pytest.approx(2 * 400 / (400 + 800))  # pooled over its 2 slices
    assert by_case["b"]["infection_hd95"] == pytest.approx(np.hypot(32, 32))  # the miss costs the diagonal


def test_each_slice_can_have_its_own_pixel_size():
    truth = np.zeros((2, 32, 32), np.uint8)
    truth[:, 5:25, 5:25] = 1
    predicted = np.roll(truth, 2, axis=2)  # two pixels off on both slices
    slice_rows, case_rows = metric_tables(predicted, truth, np.array(["a", "b"]), pixel_mm=np.array([1.0, 2.5]))
    assert slice_rows[0]["lung_hd95"] == pytest.approx(2.0)
    assert slice_rows[1]["lung_hd95"] == pytest.approx(5.0)
    assert slice_rows[0]["lung_dice"] == slice_rows[1]["lung_dice"]  # overlap does not depend on it
    truth[1] = 0  # nothing to find on "b": a false lung costs the diagonal of 2.5 mm pixels
    _, case_rows = metric_tables(predicted, truth, np.array(["a", "b"]), pixel_mm=np.array([1.0, 2.5]))
    assert {row["case"]: row for row in case_rows}["b"]["lung_hd95"] == pytest.approx(2.5 * np.hypot(32, 32))


def test_pr_curve_and_sweep_of_a_perfect_and_a_useless_probability():
    truth = np.zeros((2, 20, 20), np.uint8)
    truth[:, 4:16, 4:16] = 1
    truth[:, 6:10, 6:10] = 2
    perfect = (truth == 2).astype(np.float16) * 0.98 + 0.01
    rows, average_precision = precision_recall_curve(perfect, truth)
    assert average_precision == pytest.approx(1.0)
    sweep = threshold_sweep(perfect, truth, np.array(["a", "a"]))
    assert all(row["dice_pooled"] == 1.0 and row["healthy_lung_called_infection"] == 0.0 for row in sweep)
    constant = np.full(truth.shape, 0.5, np.float16)
    _, useless = precision_recall_curve(constant, truth)
    assert useless == pytest.approx((truth == 2).mean(), rel=1e-3)  # AP of a coin = prevalence
    assert [row["recall"] for row in rows] == sorted(row["recall"] for row in rows)


def test_healthy_lung_called_infection():
    truth = np.ones((2, 10, 10), np.uint8)  # all healthy lung
    truth[1, :5] = 2
    predicted = np.ones_like(truth)
    predicted[0, 0, :5] = 2  # 5 of 100 healthy pixels in case a
    predicted[1, :5] = 2  # infection called where it is: no false positive
    result = healthy_lung_called_infection(predicted, truth, np.array(["a", "b"]))
    assert result["per_case"] == {"a": 0.05, "b": 0.0}
    assert result["pooled"] == pytest.approx(5 / 150)


def test_degradation_blurs_but_keeps_shape_and_recipe_range():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    degraded = degrade_resolution(images, pixel_mm=1.0, target_mm=3.0)
    assert degraded.shape == images.shape and degraded.dtype == np.uint8
    # the fine random texture is gone: neighbouring pixels now agree far more than before
    roughness = lambda a: np.abs(np.diff(a.astype(float), axis=-1)).mean()  # noqa: E731
    assert roughness(degraded) < 0.6 * roughness(images)
    with pytest.raises(ValueError, match="not coarser"):
        degrade_resolution(images, pixel_mm=3.0, target_mm=3.0)


def test_degradation_per_slice_pixel_size():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, 64, 64), dtype=np.uint8)
    both = degrade_resolution(images, pixel_mm=np.array([1.0, 2.0]), target_mm=3.0)
    np.testing.assert_array_equal(both[:1], degrade_resolution(images[:1], pixel_mm=1.0, target_mm=3.0))
    np.testing.assert_array_equal(both[1:], degrade_resolution(images[1:], pixel_mm=2.0, target_mm=3.0))
    assert not np.array_equal(both[0], degrade_resolution(images[:1], pixel_mm=2.0, target_mm=3.0)[0])
    with pytest.raises(ValueError, match="not coarser"):
        degrade_resolution(images, pixel_mm=np.array([1.0, 3.5]), target_mm=3.0)
