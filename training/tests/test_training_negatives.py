"""Negative slices: read through the engine from HU, labelled from the classical lung mask, held out
per fold as the issue says, sampled evenly over scans and levels, and mixed into training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.preprocessing import IntensityRecipe, preprocess_slices
from covidseg_training.classical_lung import classical_lung_mask
from covidseg_training.config import TrainConfig
from covidseg_training.data import INFECTION, LUNG
from covidseg_training.negatives import NegativesConfig, NegativeSampler, load_negatives, lung_levels
from covidseg_training.train import negative_sampler
from whole_chest import SPACING_ZYX, whole_chest

RECIPE = IntensityRecipe(input_size=64)


@pytest.fixture(scope="module")
def chest_file(tmp_path_factory):
    """The synthetic whole chest as a NIfTI file in HU, written with a non-canonical orientation (RAS)
    so the engine's reader has to reorient it."""
    chest = whole_chest()
    image = sitk.GetImageFromArray(chest.volume.astype(np.int16))
    image.SetSpacing(SPACING_ZYX[::-1])
    image = sitk.DICOMOrient(image, "RAS")
    path = tmp_path_factory.mktemp("negatives") / "chest.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def test_negative_slices_are_what_the_engine_feeds_the_network(chest_file, tmp_path):
    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    canonical = sitk.Cast(to_canonical(read_image(chest_file)), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(canonical)
    np.testing.assert_array_equal(scan.slices.images, preprocess_slices(volume, RECIPE))
    assert scan.slices.labels.shape == (len(volume), 64, 64)
    assert not (scan.slices.labels == INFECTION).any(), "every voxel of a negative scan is 'no infection'"
    lungs = classical_lung_mask(volume, canonical.GetSpacing()[::-1])
    with_lung = lungs.any(axis=(1, 2))
    np.testing.assert_array_equal((scan.slices.labels == LUNG).any(axis=(1, 2)), with_lung)
    assert set(scan.slices.cases) == {chest_file.name}
    # Levels: 0 at the lowest lung slice, 1 at the highest, below 0 under the lungs.
    assert scan.levels[np.flatnonzero(with_lung)[0]] == 0.0
    assert scan.levels[np.flatnonzero(with_lung)[-1]] == 1.0
    assert scan.levels[0] < 0


def test_cache_gives_the_same_slices(chest_file, tmp_path):
    config = NegativesConfig(root=str(chest_file.parent))
    (fresh,) = load_negatives(config, RECIPE, [chest_file.name], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("negative-chest.nii.gz-*.npz"))) == 1
    (cached,) = load_negatives(config, RECIPE, [chest_file.name], cache_dir=tmp_path)
    np.testing.assert_array_equal(cached.slices.images, fresh.slices.images)
    np.testing.assert_array_equal(cached.slices.labels, fresh.slices.labels)
    np.testing.assert_array_equal(cached.levels, fresh.levels)


def test_missing_scan_is_a_clear_error(tmp_path):
    config = NegativesConfig(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LIDC-IDRI-0001"):
        load_negatives(config, RECIPE, ["LIDC-IDRI-0001"])


@pytest.mark.parametrize("fold, left_out", [(0, "LIDC-IDRI-0001"), (1, "LIDC-IDRI-0003"), (2, "LIDC-IDRI-0001"),
                                            (3, "LIDC-IDRI-0003"), (4, "LIDC-IDRI-0001")])
def test_each_fold_leaves_one_lidc_scan_out(fold, left_out):
    names = NegativesConfig().scans_for_fold(fold)
    assert left_out not in names
    assert len(names) == 2 and "abdominal-ct" in names


def test_the_released_model_trains_on_every_negative_scan():
    assert NegativesConfig().scans_for_fold(None) == ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "abdominal-ct"]
    for scans in NegativesConfig().holdout.values():
        assert not {"example-chest-ct", "covid-chest-ct"} & set(scans)


def test_config_block_round_trips_through_json():
    config = TrainConfig.from_dict({"negatives": {"per_epoch": 300, "holdout": {"0": ["abdominal-ct"]}}})
    assert config.negatives.per_epoch == 300
    assert config.negatives.scans_for_fold(0) == ["LIDC-IDRI-0001", "LIDC-IDRI-0003"]
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.negatives == config.negatives


def test_sampler_spreads_over_scans_and_levels_and_is_reproducible(chest_file):
    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    small = type(scan)("small", scan.slices.subset(np.arange(len(scan.slices.images)) < 10), scan.levels[:10])
    sampler = NegativeSampler([scan, small], per_epoch=400, seed=3)
    picks = sampler.epoch(0)
    assert len(picks) == 400
    per_scan = np.bincount([s for s, _ in picks])
    assert per_scan.tolist() == [200, 200], "evenly over scans, whatever their length"
    slices_of_big = {i for s, i in picks if s == 0}
    assert len(slices_of_big) > 0.8 * len(scan.slices.images), "every level is drawn"
    assert sampler.epoch(0) == picks, "an epoch's draw depends only on seed and epoch (resume)"
    assert sampler.epoch(1) != picks
    image, label = sampler.slice(*picks[0])
    assert image.shape == label.shape == (64, 64)
    assert NegativeSampler([], 100).epoch(0) == []


def test_training_without_negatives_draws_none():
    assert negative_sampler(TrainConfig()).per_epoch == 0


def test_lung_levels_without_lung_are_nan():
    assert np.isnan(lung_levels(np.zeros((4, 3, 3), dtype=bool))).all()


def test_training_mixes_the_negatives_into_every_epoch(chest_file, tmp_path):
    """A tiny run on synthetic labelled slices plus the negative scan: each epoch trains on both, the
    history says how many of each, and a held-out scan is not loaded."""
    from covidseg_training.data import SliceDataset
    from covidseg_training.train import train

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 64, 64), dtype=np.uint8)
    labels = np.zeros((12, 64, 64), dtype=np.uint8)
    labels[:, 20:40, 10:30] = LUNG
    labels[:, 25:30, 15:20] = INFECTION
    data = tmp_path / "labelled.npz"
    SliceDataset(images, labels, np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), 2)).save(data)
    config = TrainConfig.from_dict({
        "name": "mix", "data": str(data), "output_dir": str(tmp_path / "runs"), "fold": 0, "n_folds": 3,
        "input_size": 64, "base_channels": 4, "depth": 2, "epochs": 2, "batch_size": 4, "threads": 1,
        "device": "cpu",
        "negatives": {"scans": [chest_file.name, "not-there.nii.gz"], "per_epoch": 6, "root": str(chest_file.parent),
                      "holdout": {0: ["not-there.nii.gz"]}},
    })
    run = train(config, log=lambda _: None)
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [row["slices"] for row in history] == [{"labelled": 8, "negative": 6}] * 2
    assert list((tmp_path / "runs" / "cache").glob("negative-chest.nii.gz-*.npz"))


def test_augmented_batches_do_not_depend_on_worker_count_or_resume():
    from covidseg_training.train import epoch_batches

    rng = np.random.default_rng(1)
    slices = [(rng.integers(0, 255, (64, 64), dtype=np.uint8), np.zeros((64, 64), dtype=np.uint8)) for _ in range(8)]
    config = TrainConfig.from_dict({"input_size": 64, "batch_size": 4, "seed": 5})
    serial = [images.numpy() for images, _ in epoch_batches(slices, config, epoch=3, steps=2)]
    config.workers = 2
    parallel = [images.numpy() for images, _ in epoch_batches(slices, config, epoch=3, steps=2)]
    np.testing.assert_array_equal(np.stack(serial), np.stack(parallel))
    other_epoch = [images.numpy() for images, _ in epoch_batches(slices, config, epoch=4, steps=2)]
    assert not np.array_equal(np.stack(serial), np.stack(other_epoch))
