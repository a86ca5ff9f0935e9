"""Synthetic solid masses: painted only into clear lung, away from infection, at the slice's soft-tissue
gray level, and labelled "lung, no infection" (issue 10: nodules and tumours called infection)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training import masses
from covidseg_training.augment import AugmentConfig, SliceAugmenter
from covidseg_training.data import BACKGROUND, INFECTION, LUNG, LUNG_UNKNOWN, SliceDataset
from covidseg_training.masses import (
    GRAY_OF_SOFT_TISSUE, INFECTION_CLEARANCE_PX, MAX_HOLE_PX, classical_mass_label, paint_masses,
)

SOFT_TISSUE = 170
ONLY_MASSES = dict(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0, mass_p=1)


def chest_slice(lung_value: int = LUNG, with_infection: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A 128 x 128 slice: air outside, a soft-tissue body, two lungs of noisy dark gray, and (on the
    right lung) a patch of infection."""
    rng = np.random.default_rng(1)
    image = np.full((128, 128), 10, np.uint8)
    cv2.ellipse(image, (64, 64), (60, 50), 0, 0, 360, SOFT_TISSUE, -1)
    label = np.zeros((128, 128), np.uint8)
    label[30:100, 14:58] = lung_value
    label[30:100, 70:114] = lung_value
    if with_infection:
        label[70:90, 90:110] = INFECTION
    lung = label != 0
    image[lung] = np.clip(rng.normal(50, 8, np.count_nonzero(lung)), 0, 255).astype(np.uint8)
    image[label == INFECTION] = 120
    return image, label


@pytest.mark.parametrize("lung_value", [LUNG, LUNG_UNKNOWN])
def test_masses_go_into_clear_lung_at_soft_tissue_gray_and_are_labelled_lung(lung_value):
    image, label = chest_slice(lung_value)
    lung = (label == LUNG) | (label == LUNG_UNKNOWN)
    infection = label == INFECTION
    from_infection = cv2.distanceTransform((~infection).astype(np.uint8), cv2.DIST_L2, 5)
    painted_any = 0
    for seed in range(12):
        out, out_label = paint_masses(image, label, np.random.default_rng(seed))
        changed = out != image
        assert not (changed & ~lung).any(), "a mass reached outside the lung"
        np.testing.assert_array_equal(out_label[infection], INFECTION)
        assert set(np.unique(out_label[out_label != label])) <= {LUNG}
        mass = (out_label == LUNG) & (label != LUNG)
        if lung_value == LUNG:  # the label cannot show it: the image changes where masses lie
            mass = changed & (out.astype(int) > 110)
        if not mass.any():
            continue
        painted_any += 1
        assert from_infection[mass].min() >= INFECTION_CLEARANCE_PX
        low, high = (SOFT_TISSUE * f for f in GRAY_OF_SOFT_TISSUE)
        assert low - 20 <= float(np.percentile(out[mass], 90)) <= high + 20
    assert painted_any >= 10


def test_a_halo_of_ground_glass_surrounds_the_masses_when_asked():
    image, label = chest_slice(LUNG_UNKNOWN)
    lung = label == LUNG_UNKNOWN
    from_infection = cv2.distanceTransform((label != INFECTION).astype(np.uint8), cv2.DIST_L2, 5)
    hazy_share = {}
    for halo_p in (0.0, 1.0):
        shares = []
        for seed in range(12):
            out, out_label = paint_masses(image, label, np.random.default_rng(seed), halo_p)
            changed = out != image
            assert not (changed & ~lung).any(), "a mass or halo reached outside the lung"
            assert not (changed & (from_infection < INFECTION_CLEARANCE_PX)).any(), "painted next to infection"
            np.testing.assert_array_equal(out_label[label == INFECTION], INFECTION)
            painted = (out_label == LUNG) & (label != LUNG)
            if painted.any():
                gray = out[painted].astype(int)
                shares.append(float(np.mean((gray > 65) & (gray < 125))))  # between lung (50) and soft tissue
        assert len(shares) >= 10
        hazy_share[halo_p] = float(np.median(shares))
    assert hazy_share[1.0] >= 0.4 and hazy_share[0.0] <= 0.2, hazy_share


def test_a_mass_halo_p_outside_0_1_is_refused_by_name():
    with pytest.raises(ValueError, match="augment.mass_halo_p must lie in"):
        AugmentConfig(mass_p=0.3, mass_halo_p=1.5)


def test_a_slice_with_too_little_lung_is_left_alone():
    image, label = chest_slice()
    label[label == LUNG] = 0
    label[40:50, 20:40] = LUNG
    out, out_label = paint_masses(image, label, np.random.default_rng(0))
    assert out is image and out_label is label


def test_the_augmenter_paints_masses_only_when_asked():
    image, label = chest_slice(LUNG_UNKNOWN, with_infection=False)
    recipe = IntensityRecipe(input_size=128)
    painting = SliceAugmenter(AugmentConfig(**ONLY_MASSES), recipe, seed=0)
    plain = SliceAugmenter(AugmentConfig(**{**ONLY_MASSES, "mass_p": 0}), recipe, seed=0)
    for position in range(4):
        painting.reseed(0, position)
        plain.reseed(0, position)
        out, out_label = painting(image, label)
        assert (out_label == LUNG).any() and (out != image).any()
        same, same_label = plain(image, label)
        np.testing.assert_array_equal(same, image)
        np.testing.assert_array_equal(same_label, label)


def test_masses_on_negatives_go_only_into_the_slices_flagged_negative():
    image, label = chest_slice(LUNG_UNKNOWN, with_infection=False)
    augmenter = SliceAugmenter(AugmentConfig(**ONLY_MASSES, mass_on="negatives"), IntensityRecipe(input_size=128), seed=0)
    for position in range(4):
        augmenter.reseed(0, position)
        out, out_label = augmenter(image, label, negative=True)
        assert (out_label == LUNG).any() and (out != image).any()
        augmenter.reseed(0, position)
        same, same_label = augmenter(image, label)
        np.testing.assert_array_equal(same, image)
        np.testing.assert_array_equal(same_label, label)


def test_training_batches_carry_which_slices_are_negative():
    from covidseg_training.config import TrainConfig
    from covidseg_training.train import epoch_batches

    image, label = chest_slice(LUNG_UNKNOWN, with_infection=False)
    config = TrainConfig.from_dict({"input_size": 128, "batch_size": 2, "augment": {**ONLY_MASSES, "mass_on": "negatives"}})
    flags = [True, False, False, True]
    images, labels = zip(*epoch_batches([(image, label)] * 4, config, epoch=0, steps=2, negative=flags))
    painted = [bool((batch[i].numpy() == LUNG).any()) for batch in labels for i in range(2)]
    assert painted == flags
    untouched = [np.array_equal(batch[i].numpy(), image) for batch in images for i in range(2)]
    assert untouched == [not flag for flag in flags]


def test_masses_start_at_mass_from_epoch_and_earlier_epochs_draw_what_a_run_without_them_draws():
    from covidseg_training.config import TrainConfig
    from covidseg_training.train import epoch_batches

    image, label = chest_slice(LUNG_UNKNOWN, with_infection=False)
    settings = {"input_size": 128, "batch_size": 2, "epochs": 4, "augment": {"kernel_p": 0.5}}
    late = TrainConfig.from_dict({**settings, "augment": {"kernel_p": 0.5, "mass_p": 1, "mass_halo_p": 0.5,
                                                          "mass_from_epoch": 3}})
    without = TrainConfig.from_dict(settings)

    def epoch(config, index):  # index counts from 0, the epochs in the config from 1
        return [tensor.numpy() for batch in epoch_batches([(image, label)] * 4, config, epoch=index, steps=2)
                for tensor in batch]

    for index in (0, 1):  # epochs 1 and 2: every augmentation as without masses, to the pixel
        for ours, theirs in zip(epoch(late, index), epoch(without, index), strict=True):
            np.testing.assert_array_equal(ours, theirs)
    for index in (2, 3):  # epochs 3 and 4: every slice gets masses, labelled "lung, no infection"
        labels = epoch(late, index)[1::2]
        assert all((batch[i] == LUNG).any() for batch in labels for i in range(2))
        assert not any((batch[i] == LUNG).any() for batch in epoch(without, index)[1::2] for i in range(2))


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_a_mass_from_epoch_that_is_not_an_epoch_is_refused_by_name(value):
    with pytest.raises(ValueError, match="augment.mass_from_epoch must be a whole number of at least 1"):
        AugmentConfig(mass_p=0.3, mass_from_epoch=value)


def test_masses_from_after_the_last_epoch_are_refused():
    from covidseg_training.config import TrainConfig

    with pytest.raises(ValueError, match="augment.mass_from_epoch 31 is after the last epoch .30.: no epoch"):
        TrainConfig.from_dict({"epochs": 30, "augment": {"mass_p": 0.3, "mass_from_epoch": 31}})
    assert TrainConfig.from_dict({"epochs": 30, "augment": {"mass_p": 0.3, "mass_from_epoch": 30}})


def test_an_unknown_mass_on_is_refused_by_name():
    from covidseg_training.config import TrainConfig

    with pytest.raises(ValueError, match="augment.mass_on must be one of all, negatives, not 'positives'"):
        TrainConfig.from_dict({"augment": {"mass_p": 0.3, "mass_on": "positives"}})


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.hypot(rows - centre[0], cols - centre[1]) <= radius


def test_classical_label_a_mass_at_the_lung_edge_or_larger_than_a_filled_hole_is_not_lung():
    lung = np.zeros((128, 128), bool)
    lung[10:118, 10:118] = True
    from_edge = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5)
    assert classical_mass_label(disc(lung.shape, (64, 64), 5), from_edge) == LUNG  # 81 px, inside: a filled hole
    assert classical_mass_label(disc(lung.shape, (17, 64), 5), from_edge) == LUNG  # 2 px from the edge
    assert classical_mass_label(disc(lung.shape, (13, 64), 5) & lung, from_edge) == BACKGROUND  # cut by the edge
    large = disc(lung.shape, (64, 64), 10)
    assert np.count_nonzero(large) > MAX_HOLE_PX  # 317 px: over 5 cm2 at 1.367 mm
    assert classical_mass_label(large, from_edge) == BACKGROUND
    assert classical_mass_label(np.zeros_like(lung), from_edge) == LUNG


def test_classical_label_paints_the_same_masses_and_only_relabels_some_of_them_background():
    image, label = chest_slice()
    lung = (label == LUNG) | (label == LUNG_UNKNOWN)
    relabelled = 0
    for seed in range(12):
        out, as_lung = paint_masses(image, label, np.random.default_rng(seed), halo_p=0.5)
        same, classical = paint_masses(image, label, np.random.default_rng(seed), halo_p=0.5, mass_label="classical")
        np.testing.assert_array_equal(out, same)  # the same draws: only the label differs
        differs = classical != as_lung
        assert set(np.unique(as_lung[differs])) <= {LUNG} and set(np.unique(classical[differs])) <= {BACKGROUND}
        assert not (differs & ~lung).any() and not (differs & (out == image)).any()
        relabelled += bool(differs.any())
    assert relabelled >= 6  # masses reaching these narrow lungs' edges are common


def test_an_unknown_mass_label_is_refused_by_name():
    from covidseg_training.config import TrainConfig

    with pytest.raises(ValueError, match="augment.mass_label must be one of lung, classical, not 'tumour'"):
        TrainConfig.from_dict({"augment": {"mass_p": 0.3, "mass_label": "tumour"}})
    image, label = chest_slice()
    with pytest.raises(ValueError, match="mass_label must be one of lung, classical"):
        paint_masses(image, label, np.random.default_rng(0), mass_label="tumour")


def test_preview_writes_a_picture_and_refuses_missing_data(tmp_path, capsys):
    slices = [chest_slice() for _ in range(3)]
    data = tmp_path / "slices.npz"
    SliceDataset(np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices]), np.array(["a", "b", "c"])).save(data)
    out = tmp_path / "masses.png"
    assert masses.main([str(out), "--data", str(data), "--count", "2"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert masses.main([str(tmp_path / "other.png"), "--data", str(tmp_path / "none.npz")]) == 2
    assert "no prepared slices" in capsys.readouterr().err
    assert not (tmp_path / "other.png").exists()
    with pytest.raises(SystemExit):
        masses.main([str(tmp_path / "third.png"), "--data", str(data), "--halo-p", "1.5"])
    assert "--halo-p must lie in [0, 1], not 1.5" in capsys.readouterr().err
    assert not (tmp_path / "third.png").exists()
