"""The path probe: AUC arithmetic, healthy-lung patches only, and a classifier that separates paths
that differ and cannot separate paths that do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covidseg_training.data import INFECTION, LUNG, SliceDataset
from covidseg_training.path_probe import lung_patches, probe, roc_auc


def test_roc_auc():
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_patches_are_healthy_lung_only():
    labels = np.zeros((1, 128, 128), dtype=np.uint8)
    labels[0, 10:110, 10:110] = LUNG
    labels[0, 60:70, 60:70] = INFECTION
    images = np.zeros((1, 128, 128), dtype=np.uint8)
    images[0][labels[0] == LUNG] = 100
    images[0][labels[0] == INFECTION] = 255
    patches, origin = lung_patches(images, labels, np.random.default_rng(0), per_slice=50, size=16)
    assert len(patches) == 50 and (origin == 0).all()
    assert (patches == 100).mean() >= 0.95, "patches lie in lung"
    assert not (patches == 255).any(), "no infection inside a patch"


def _slices(rng, count, texture, cases):
    images = np.clip(rng.normal(100, texture, (count, 96, 96)), 0, 255).astype(np.uint8)
    labels = np.full((count, 96, 96), LUNG, dtype=np.uint8)
    return SliceDataset(images, labels, np.array(cases))


@pytest.mark.parametrize("negative_texture, expect_separable", [(40.0, True), (10.0, False)])
def test_probe_tells_different_paths_apart_and_not_equal_ones(negative_texture, expect_separable):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    positives = _slices(rng, 24, 10.0, [f"p{i % 6}" for i in range(24)])
    negatives = [_slices(rng, 12, negative_texture, ["n1"] * 12), _slices(rng, 12, negative_texture, ["n2"] * 12)]
    result = probe(positives, negatives, epochs=2)
    if expect_separable:
        assert result["auc"] > 0.9
    else:
        assert 0.3 < result["auc"] < 0.7


def test_other_scans_are_placed_on_the_path_they_look_like():
    from covidseg_training.path_probe import score_other_scans

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    positives = _slices(rng, 128, 10.0, [f"p{i % 6}" for i in range(128)])
    negatives = [_slices(rng, 32, 40.0, ["n1"] * 32), _slices(rng, 32, 40.0, ["n2"] * 32)]
    others = {"noisy": _slices(rng, 6, 40.0, ["o1"] * 6), "smooth": _slices(rng, 6, 10.0, ["o2"] * 6)}
    scores = score_other_scans(positives, negatives, others, epochs=4)
    assert scores["noisy"]["mean_negative_path_probability"] > 0.8
    assert scores["smooth"]["mean_negative_path_probability"] < 0.2
    assert scores["noisy"]["patches"] > 0


def test_probe_records_the_augmentation_it_applied():
    from covidseg_training.augment import AugmentConfig

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    positives = _slices(rng, 12, 10.0, [f"p{i % 6}" for i in range(12)])
    negatives = [_slices(rng, 6, 40.0, ["n1"] * 6), _slices(rng, 6, 40.0, ["n2"] * 6)]
    assert probe(positives, negatives, epochs=1)["augment"] is None
    result = probe(positives, negatives, augment=AugmentConfig(kernel_p=1.0), epochs=1)
    assert result["augment"]["kernel_p"] == 1.0 and result["augment"]["flip_p"] == AugmentConfig().flip_p


def test_the_negatives_are_augmented_as_negatives():
    """What training gives the negative slices only (here the harmonisation with ``harmonise_on: negatives``)
    the probe gives its negatives only."""
    from covidseg_training.augment import AugmentConfig
    from covidseg_training.path_probe import augmented_paths

    rng = np.random.default_rng(0)
    positives = _slices(rng, 4, 10.0, ["p1"] * 4)
    negatives = [_slices(rng, 4, 40.0, ["n1"] * 4)]
    only = dict(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0, harmonise_p=1)
    out_positives, (out_negatives,) = augmented_paths(positives, negatives, 0,
                                                      AugmentConfig(**only, harmonise_on="negatives"))
    np.testing.assert_array_equal(out_positives.images, positives.images)
    assert not np.array_equal(out_negatives.images, negatives[0].images)
