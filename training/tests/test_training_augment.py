"""Harmonisation: a slice re-rendered in a random kernel, its lung at a random gray level, so that
the data path it came from cannot be told (issue 10's path probe)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training.augment import (
    DETAIL_RANGE,
    LUNG_MEAN_RANGE,
    LUNG_STD_RANGE,
    AugmentConfig,
    SliceAugmenter,
    detail_in,
    detail_region,
)
from covidseg_training.config import TrainConfig
from covidseg_training.data import LUNG, SliceDataset
from covidseg_training.path_probe import probe

ONLY_HARMONISE = dict(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0, harmonise_p=1)


def _texture(rng, shape, mean, noise, sigma):
    """Gray level ``mean`` with noise of ``noise`` std, smoothed at ``sigma`` (soft kernel: high sigma)."""
    field = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma)
    return np.clip(mean + noise * field / field.std(), 0, 255).astype(np.uint8)


def test_harmonised_lung_lands_in_the_ranges_and_the_label_stays():
    rng = np.random.default_rng(0)
    label = np.zeros((96, 96), np.uint8)
    label[16:80, 10:86] = LUNG
    augmenter = SliceAugmenter(AugmentConfig(**ONLY_HARMONISE), IntensityRecipe(input_size=96), seed=0)
    for image in (_texture(rng, (96, 96), 60, 20, 1.5), _texture(rng, (96, 96), 100, 40, 0.5)):
        for position in range(6):
            augmenter.reseed(0, position)
            out, out_label = augmenter(image, label)
            np.testing.assert_array_equal(out_label, label)
            lung = out[label == LUNG].astype(float)
            assert DETAIL_RANGE[0] - 3 <= detail_in(out, detail_region(label)) <= DETAIL_RANGE[1] + 3
            assert LUNG_MEAN_RANGE[0] - 3 <= lung.mean() <= LUNG_MEAN_RANGE[1] + 3
            assert LUNG_STD_RANGE[0] - 5 <= lung.std() <= LUNG_STD_RANGE[1] + 5


def test_harmonising_hides_which_path_a_slice_came_from():
    # Path A: bright and sharp; path B: dark and soft. The probe tells them apart as they are, and
    # far less once every slice is harmonised (0.72 here; on the real paths 0.56, results/path_probe.md).
    def path(rng, count, mean, sigma, cases):
        images = np.stack([_texture(rng, (96, 96), mean, 25, sigma) for _ in range(count)])
        return SliceDataset(images, np.full(images.shape, LUNG, np.uint8), np.array(cases))

    rng = np.random.default_rng(0)
    sharp = path(rng, 36, 100, 0.5, [f"p{i % 6}" for i in range(36)])
    soft = [path(rng, 12, 60, 1.5, ["n1"] * 12), path(rng, 12, 60, 1.5, ["n2"] * 12)]
    torch.manual_seed(0)
    assert probe(sharp, soft, epochs=2)["auc"] > 0.95
    torch.manual_seed(0)
    assert probe(sharp, soft, augment=AugmentConfig(**ONLY_HARMONISE), epochs=2)["auc"] < 0.8


def test_a_higher_base_detail_keeps_more_of_the_slices_own_texture():
    # The re-rendering blurs the slice down to ``harmonise_base_detail`` before its noise: the higher that
    # range, the more of the slice's own fine texture (where faint ground glass lies) survives.
    rng = np.random.default_rng(1)
    label = np.zeros((96, 96), np.uint8)
    label[16:80, 10:86] = LUNG
    image = _texture(rng, (96, 96), 90, 40, 0.5)  # sharp
    lung = label == LUNG

    def kept(base_detail):
        config = AugmentConfig(**ONLY_HARMONISE, harmonise_base_detail=base_detail)
        augmenter = SliceAugmenter(config, IntensityRecipe(input_size=96), seed=0)
        correlations = []
        for position in range(6):
            augmenter.reseed(0, position)
            out, _ = augmenter(image, label)
            correlations.append(np.corrcoef(out[lung].astype(float), image[lung].astype(float))[0, 1])
        return float(np.mean(correlations))

    default, mild = kept((6.0, 9.0)), kept((12.0, 16.0))
    assert mild > default + 0.1, (default, mild)
    assert AugmentConfig().harmonise_base_detail == (6.0, 9.0)


def test_harmonise_base_detail_comes_from_the_config_and_is_checked():
    assert TrainConfig.from_dict({"augment": {"harmonise_base_detail": [12, 16]}}).augment.harmonise_base_detail == (12, 16)
    with pytest.raises(ValueError, match="augment.harmonise_base_detail must be"):
        TrainConfig.from_dict({"augment": {"harmonise_base_detail": [16, 12]}})


def test_harmonising_the_negatives_only_leaves_the_labelled_slices_as_they_are():
    rng = np.random.default_rng(2)
    label = np.zeros((96, 96), np.uint8)
    label[16:80, 10:86] = LUNG
    image = _texture(rng, (96, 96), 90, 40, 0.5)
    everywhere = SliceAugmenter(AugmentConfig(**ONLY_HARMONISE), IntensityRecipe(input_size=96), seed=0)
    negatives_only = SliceAugmenter(AugmentConfig(**ONLY_HARMONISE, harmonise_on="negatives"),
                                    IntensityRecipe(input_size=96), seed=0)
    for position in range(4):
        for augmenter in (everywhere, negatives_only):
            augmenter.reseed(0, position)
        labelled, _ = negatives_only(image, label)
        np.testing.assert_array_equal(labelled, image)
        negatives_only.reseed(0, position)
        negative, _ = negatives_only(image, label, negative=True)
        harmonised, _ = everywhere(image, label, negative=True)
        np.testing.assert_array_equal(negative, harmonised)  # the same draws as harmonising every slice
        assert not np.array_equal(negative, image)


def test_harmonise_on_comes_from_the_config_and_is_checked():
    assert TrainConfig.from_dict({"augment": {"harmonise_on": "negatives"}}).augment.harmonise_on == "negatives"
    assert AugmentConfig().harmonise_on == "all"
    with pytest.raises(ValueError, match="augment.harmonise_on must be one of all, negatives, not 'positives'"):
        TrainConfig.from_dict({"augment": {"harmonise_p": 0.5, "harmonise_on": "positives"}})
