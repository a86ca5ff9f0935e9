"""Fainter infection: a labelled slice's infection brought part of the way back to the clear lung, its fine
texture kept, nothing outside the lung touched (issue 10: the held-out folds miss the faintest ground glass)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training.augment import AugmentConfig, SliceAugmenter
from covidseg_training.config import TrainConfig
from covidseg_training import faint_infection
from covidseg_training.data import INFECTION, LUNG, SliceDataset
from covidseg_training.faint_infection import fade_infection

LUNG_GRAY, INFECTION_GRAY, SOFT_TISSUE = 50, 130, 170
ONLY_FAINT = dict(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0, faint_p=1)


def infected_slice() -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 128 slice: air outside, a soft-tissue body, two lungs of noisy dark gray, and a patch of
    infection in the right lung with a fine checkerboard texture (vessels seen through ground glass)."""
    rng = np.random.default_rng(3)
    image = np.full((128, 128), 10, np.uint8)
    cv2.ellipse(image, (64, 64), (60, 50), 0, 0, 360, SOFT_TISSUE, -1)
    label = np.zeros((128, 128), np.uint8)
    label[30:100, 14:58] = LUNG
    label[30:100, 70:114] = LUNG
    label[60:90, 86:110] = INFECTION
    lung = label != 0
    image[lung] = np.clip(rng.normal(LUNG_GRAY, 4, np.count_nonzero(lung)), 0, 255).astype(np.uint8)
    rows, cols = np.mgrid[:128, :128]
    texture = np.where((rows + cols) % 2 == 0, 12, -12)
    image[label == INFECTION] = (INFECTION_GRAY + texture)[label == INFECTION]
    return image, label


def core(label: np.ndarray) -> np.ndarray:
    """The infection eroded by 4 pixels, out of reach of the fade's blurred edge."""
    return cv2.erode((label == INFECTION).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0


@pytest.mark.parametrize("contrast", [(0.5, 0.5), (0.8, 0.8)])
def test_the_infection_keeps_the_drawn_share_of_its_density_above_the_lung(contrast):
    image, label = infected_slice()
    faded = fade_infection(image, label, np.random.default_rng(0), contrast)
    inside = core(label)
    before = image[inside].mean() - LUNG_GRAY
    after = faded[inside].astype(float).mean() - LUNG_GRAY
    assert after == pytest.approx(contrast[0] * before, abs=3)


def test_the_fade_keeps_the_texture_and_stays_inside_the_lung():
    image, label = infected_slice()
    faded = fade_infection(image, label, np.random.default_rng(0), (0.5, 0.5))
    changed = faded != image
    assert changed[label == INFECTION].mean() > 0.95
    assert not (changed & (label == 0)).any(), "the fade reached outside the lung"
    far = cv2.distanceTransform((label != INFECTION).astype(np.uint8), cv2.DIST_L2, 5) > 4
    assert not (changed & far).any(), "the fade reached lung away from the infection"
    inside = core(label)
    fine = lambda x: (x.astype(np.float32) - cv2.GaussianBlur(x.astype(np.float32), (0, 0), 1.0))[inside]
    assert np.corrcoef(fine(image), fine(faded))[0, 1] > 0.95
    assert fine(faded).std() > 0.8 * fine(image).std()


def test_a_slice_with_too_little_infection_or_clear_lung_is_left_as_it_is():
    image, label = infected_slice()
    no_infection = np.where(label == INFECTION, LUNG, label).astype(np.uint8)
    assert fade_infection(image, no_infection, np.random.default_rng(0)) is image
    all_infection = np.where(label == LUNG, INFECTION, label).astype(np.uint8)
    assert fade_infection(image, all_infection, np.random.default_rng(0)) is image


def test_the_augmenter_fades_labelled_slices_only_and_keeps_their_labels():
    image, label = infected_slice()
    augment = SliceAugmenter(AugmentConfig(**ONLY_FAINT, faint_contrast=(0.5, 0.5)), IntensityRecipe())
    faded, faded_label = augment(image, label)
    np.testing.assert_array_equal(faded_label, label)
    inside = core(label)
    assert faded[inside].astype(float).mean() - LUNG_GRAY < 0.6 * (image[inside].mean() - LUNG_GRAY)
    negative, _ = augment(image, label, negative=True)
    np.testing.assert_array_equal(negative, image)


def test_fainter_infection_is_checked_and_refused_with_neighbours():
    with pytest.raises(ValueError, match="faint_contrast"):
        AugmentConfig(faint_contrast=(0.5, 1.2))
    with pytest.raises(ValueError, match="faint_p"):
        AugmentConfig(faint_p=1.5)
    with pytest.raises(ValueError, match="paints fainter infection into one slice"):
        TrainConfig.from_dict({"context_slices": 1, "augment": {"faint_p": 0.3}})


def test_preview_writes_a_picture_and_refuses_missing_data(tmp_path, capsys):
    slices = [infected_slice() for _ in range(3)]
    for _, label in slices:  # enough infection for the preview to pick the slice
        label[40:90, 80:112] = INFECTION
    data = tmp_path / "slices.npz"
    SliceDataset(np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices]), np.array(["a", "b", "c"])).save(data)
    out = tmp_path / "faint.png"
    assert faint_infection.main([str(out), "--data", str(data), "--count", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert faint_infection.main([str(tmp_path / "other.png"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "no prepared slices at" in capsys.readouterr().err
    assert not (tmp_path / "other.png").exists()
