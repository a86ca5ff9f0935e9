"""Synthetic gas pockets: painted only into the soft tissue of a negative slice, away from its lung and
the body's edge, at the slice's air gray level, labelled background (issue 10: an air-filled stomach
called lung by the network)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training.augment import AugmentConfig, SliceAugmenter
from covidseg_training.config import TrainConfig
from covidseg_training.data import BACKGROUND, LUNG
from covidseg_training.gas_pockets import WALL_PX, paint_gas_pockets

AIR, SOFT_TISSUE = 12, 170
ONLY_GAS = dict(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0, gas_p=1)


def upper_abdomen_slice() -> tuple[np.ndarray, np.ndarray]:
    """A 256 x 256 slice: air outside, a soft-tissue body with noise, a lung base (labelled) at the back
    of the left side."""
    rng = np.random.default_rng(2)
    image = np.full((256, 256), AIR, np.uint8)
    cv2.ellipse(image, (128, 128), (115, 90), 0, 0, 360, SOFT_TISSUE, -1)
    body = image == SOFT_TISSUE
    image[body] = np.clip(rng.normal(SOFT_TISSUE, 6, np.count_nonzero(body)), 0, 255).astype(np.uint8)
    label = np.zeros((256, 256), np.uint8)
    label[150:200, 150:210] = LUNG
    image[label == LUNG] = 45
    return image, label


def has_pocket(out: np.ndarray, image: np.ndarray) -> bool:
    """Whether more than 50 pixels of the body became as dark as air."""
    return int(((out.astype(int) < AIR + 15) & (image.astype(int) > AIR + 20)).sum()) > 50


def test_pockets_lie_in_soft_tissue_at_air_gray_and_are_background():
    image, label = upper_abdomen_slice()
    body = cv2.erode((image > AIR + 20).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    near_lung = cv2.dilate((label == LUNG).astype(np.uint8), np.ones((2 * WALL_PX - 1,) * 2, np.uint8)) > 0
    painted_any = 0
    for seed in range(10):
        out, out_label = paint_gas_pockets(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_label, label)  # the lung stays, the pocket is background
        gas = out.astype(int) < AIR + 15
        changed = out != image
        assert not (changed & near_lung).any(), "a pocket came within its wall of the lung"
        assert not (changed & ~body).any(), "a pocket reached outside the body"
        if not gas.any():
            continue
        painted_any += 1
        assert np.count_nonzero(gas & body) > 50
        assert float(np.median(out[gas])) <= AIR + 6
    assert painted_any >= 9


def test_a_slice_without_room_for_a_pocket_is_left_alone():
    image, label = upper_abdomen_slice()
    label[:] = LUNG  # all lung: no soft tissue to put gas into
    out, out_label = paint_gas_pockets(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_label, label)


def test_the_augmenter_paints_gas_only_into_negative_slices_and_only_when_asked():
    image, label = upper_abdomen_slice()
    recipe = IntensityRecipe(input_size=256)
    painting = SliceAugmenter(AugmentConfig(**ONLY_GAS), recipe, seed=0)
    plain = SliceAugmenter(AugmentConfig(**{**ONLY_GAS, "gas_p": 0}), recipe, seed=0)
    for position in range(3):
        painting.reseed(0, position)
        out, _ = painting(image, label, negative=True)
        assert has_pocket(out, image)
        painting.reseed(0, position)
        labelled, _ = painting(image, label, negative=False)  # a labelled COVID-19 slice: never
        plain.reseed(0, position)
        same, _ = plain(image, label, negative=True)
        np.testing.assert_array_equal(labelled, image)
        np.testing.assert_array_equal(same, image)


def test_gas_max_level_keeps_pockets_out_of_the_slices_above_it():
    """With ``gas_max_level`` the pockets go only into the negative slices at most that high in their scan's
    lung (bases and below, where stomach and bowel lie), and into slices of a scan without lung (NaN); not
    into the apex, where small lung blobs in soft tissue look like a pocket."""
    image, label = upper_abdomen_slice()
    recipe = IntensityRecipe(input_size=256)
    low_only = SliceAugmenter(AugmentConfig(**ONLY_GAS, gas_max_level=0.3), recipe, seed=0)
    anywhere = SliceAugmenter(AugmentConfig(**ONLY_GAS), recipe, seed=0)
    for level, painted in ((-0.4, True), (0.0, True), (0.3, True), (float("nan"), True), (0.31, False), (0.9, False)):
        low_only.reseed(0, 1)
        out, _ = low_only(image, label, negative=True, level=level)
        assert has_pocket(out, image) is painted, level
        anywhere.reseed(0, 1)
        out, _ = anywhere(image, label, negative=True, level=level)
        assert has_pocket(out, image), level


def test_gas_radius_px_sets_the_pockets_size_and_is_checked():
    """Pockets drawn with a radius of 15-16 pixels cover at least pi * 15**2 * 0.5 pixels each (lobulated, some
    half fluid); with 4-5 pixels far less. A range that is not 0 < low <= high is refused by name."""
    image, label = upper_abdomen_slice()
    for radius_px, smallest, largest in (((15.0, 16.0), 300, 2 * 1600), ((4.0, 5.0), 10, 2 * 160)):
        for seed in range(5):
            out, _ = paint_gas_pockets(image, label, np.random.default_rng(seed), radius_px)
            gas = (out.astype(int) < AIR + 15) & (image.astype(int) > AIR + 20)
            count, _ = cv2.connectedComponents(gas.astype(np.uint8))
            assert count >= 2, radius_px
            assert smallest <= np.count_nonzero(gas) <= largest, (radius_px, np.count_nonzero(gas))
    with pytest.raises(ValueError, match="augment.gas_radius_px must be"):
        TrainConfig.from_dict({"augment": {"gas_radius_px": [20, 10]}})
    assert TrainConfig.from_dict({"augment": {"gas_radius_px": [15, 35]}}).augment.gas_radius_px == (15, 35)


def test_training_batches_carry_where_each_negative_slice_lies():
    from covidseg_training.train import epoch_batches

    image, label = upper_abdomen_slice()
    config = TrainConfig.from_dict({"input_size": 256, "batch_size": 2,
                                    "augment": {**ONLY_GAS, "gas_max_level": 0.3}})
    levels = [0.1, 0.9, float("nan"), 0.5]
    batches = epoch_batches([(image, label)] * 4, config, epoch=0, steps=2, negative=[True] * 4, levels=levels)
    painted = [has_pocket(batch[i].numpy(), image) for batch, _ in batches for i in range(2)]
    assert painted == [True, False, True, False]


def test_gas_pockets_are_refused_with_context_slices():
    with pytest.raises(ValueError, match="gas_p"):
        TrainConfig.from_dict({"context_slices": 1, "augment": {"gas_p": 0.5}})
    augmenter = SliceAugmenter(AugmentConfig(gas_p=0.5), IntensityRecipe(input_size=64), seed=0)
    with pytest.raises(ValueError, match="gas_p"):
        augmenter(np.zeros((3, 64, 64), np.uint8), np.zeros((64, 64), np.uint8))


def test_gas_pockets_on_a_real_negative_slice():
    """On the lowest slice of LIDC-IDRI-0003 (its upper abdomen, read as training reads it), a pocket lands
    in the abdomen as dark as the room air, and the labels do not change."""
    from covidseg_training.negatives import NegativesConfig, load_negatives

    from shared_data_paths import shared_path
    scan_file = shared_path("lidc-idri-chest-ct", "LIDC-IDRI-0003.nii.gz")
    (scan,) = load_negatives(NegativesConfig(root=str(scan_file.parent)), IntensityRecipe(input_size=256),
                             [scan_file.name])
    index = int(np.argmin(scan.levels))
    assert scan.levels[index] < 0  # below the lungs
    image, label = scan.slices.images[index], scan.slices.labels[index]
    out, out_label = paint_gas_pockets(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(out_label, label)
    gas = (out != image) & (out.astype(int) <= np.percentile(image, 1) + 8)
    assert np.count_nonzero(gas) > 100
    assert not (label[gas] != BACKGROUND).any()


def test_the_preview_says_clearly_when_the_negative_scans_are_missing(tmp_path, capsys):
    from covidseg_training.gas_pockets import main
    assert main([str(tmp_path / "preview.png"), "--root", str(tmp_path / "none"), "--cache", str(tmp_path / "cache")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "preview.png").exists()


def test_gas_fluid_level_p_gives_every_pocket_a_straight_lower_edge_or_none():
    """With gas_fluid_level_p 1 a pocket's lowest row of gas is most of its widest (the fluid level cuts
    it straight); with 0 it is the narrow bottom of a lobulated disc. Out of [0, 1] is refused by name."""
    image, label = upper_abdomen_slice()
    for p, low, high in ((1.0, 0.7, 1.0), (0.0, 0.0, 0.3)):
        ratios = []
        for seed in range(12):
            out, _ = paint_gas_pockets(image, label, np.random.default_rng(seed), (15.0, 30.0), fluid_level_p=p)
            gas = (out.astype(int) < AIR + 15) & (image.astype(int) > AIR + 20)
            count, components = cv2.connectedComponents(gas.astype(np.uint8))
            for component in range(1, count):
                widths = (components == component).sum(axis=1)
                ratios.append(widths[np.flatnonzero(widths)[-1]] / widths.max())
        assert low <= float(np.median(ratios)) <= high, (p, ratios)
    with pytest.raises(ValueError, match="augment.gas_fluid_level_p must lie in"):
        AugmentConfig(gas_fluid_level_p=1.5)
