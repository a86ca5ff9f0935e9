"""Negative slices: read through the engine from HU, labelled from the classical lung mask, held out
per fold as the issue says, sampled evenly over scans and levels, and mixed into training."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.preprocessing import IntensityRecipe, preprocess_slices
from covidseg_training.classical_lung import classical_lung_mask
from covidseg_training.config import TrainConfig
from covidseg_training.data import INFECTION, LUNG
from covidseg_training.lidc_nodules import nodule_mask, parse_nodule_xml
from covidseg_training.negatives import NegativesConfig, NegativeSampler, load_negatives, lung_levels
from covidseg_training.train import negative_sampler

RECIPE = IntensityRecipe(input_size=64)


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


def test_cache_follows_the_scans_content_not_its_file_times(chest_file, tmp_path):
    """A data folder copied afresh (new modification times, same bytes) keeps its cache; a scan whose
    bytes changed gets a new one."""
    scans = tmp_path / "scans"
    scans.mkdir()
    copy = scans / chest_file.name
    copy.write_bytes(chest_file.read_bytes())
    config = NegativesConfig(root=str(scans))
    load_negatives(config, RECIPE, [copy.name], cache_dir=tmp_path / "cache")
    (first,) = (tmp_path / "cache").iterdir()
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    load_negatives(config, RECIPE, [copy.name], cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]
    image = sitk.ReadImage(str(copy))
    sitk.WriteImage(image + 1, str(copy))
    load_negatives(config, RECIPE, [copy.name], cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_cache_serves_a_machine_without_the_scan(chest_file, tmp_path):
    """A GPU machine gets the cache, not the scans: the cache made for this recipe stands in for the
    missing scan; a cache made for another recipe does not, and two that fit are refused."""
    here = NegativesConfig(root=str(chest_file.parent))
    (fresh,) = load_negatives(here, RECIPE, [chest_file.name], cache_dir=tmp_path / "cache")
    load_negatives(here, IntensityRecipe(input_size=32), [chest_file.name], cache_dir=tmp_path / "cache")
    elsewhere = NegativesConfig(root=str(tmp_path / "no-scans-here"))
    (cached,) = load_negatives(elsewhere, RECIPE, [chest_file.name], cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(cached.slices.images, fresh.slices.images)
    np.testing.assert_array_equal(cached.slices.labels, fresh.slices.labels)
    with pytest.raises(FileNotFoundError, match="no cache of it for this recipe"):
        load_negatives(elsewhere, IntensityRecipe(input_size=128), [chest_file.name], cache_dir=tmp_path / "cache")
    (only,) = [p for p in (tmp_path / "cache").iterdir() if np.load(p)["images"].shape[1] == 64]
    (tmp_path / "cache" / "negative-chest.nii.gz-0123456789ab.npz").write_bytes(only.read_bytes())
    with pytest.raises(ValueError, match="2 caches of it fit this recipe"):
        load_negatives(elsewhere, RECIPE, [chest_file.name], cache_dir=tmp_path / "cache")


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
    small = type(scan)("small", scan.slices.subset(np.arange(len(scan.slices.images)) < 10), scan.levels[:10],
                       scan.dense[:10])
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


def test_hard_share_draws_in_proportion_to_the_infection_called(chest_file):
    """Half the draw goes to the slices the model calls infection on, 3:1 as their pixels; the other
    half is the uniform draw of a smaller epoch. Without hardness, or with none called, nothing changes."""
    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    small = type(scan)("small", scan.slices.subset(np.arange(len(scan.slices.images)) < 10), scan.levels[:10],
                       scan.dense[:10])
    hardness = [np.zeros(len(scan.slices.images)), np.zeros(10)]
    hardness[0][5], hardness[1][2] = 300.0, 100.0
    sampler = NegativeSampler([scan, small], per_epoch=400, seed=3, hard_share=0.5)
    picks = sampler.epoch(0, hardness)
    assert len(picks) == 400 and sampler.hard_count(hardness) == 200
    uniform, hard = picks[:200], picks[200:]
    assert np.bincount([s for s, _ in uniform]).tolist() == [100, 100]
    assert set(hard) == {(0, 5), (1, 2)}
    assert 120 <= hard.count((0, 5)) <= 180, "3:1, as the infection pixels"
    assert sampler.epoch(0, hardness) == picks, "reproducible for a resumed run"
    uniform_only = NegativeSampler([scan, small], per_epoch=400, seed=3)
    assert sampler.epoch(0) == uniform_only.epoch(0) == sampler.epoch(0, [np.zeros(len(scan.slices.images)),
                                                                           np.zeros(10)])
    with pytest.raises(ValueError, match="one weight per negative slice"):
        sampler.epoch(0, [np.ones(3), np.ones(10)])
    with pytest.raises(ValueError, match="hard_share"):
        NegativesConfig(hard_share=1.5)


def test_hardness_is_the_infection_the_model_calls_per_slice(chest_file):
    import torch

    from covidseg_training.train import negative_hardness
    from covidseg_training.unet import UNet2D

    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    sampler = NegativeSampler([scan], per_epoch=4, hard_share=0.5)
    model = UNet2D(num_classes=3, base_channels=4, depth=2)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # infection everywhere
    (everywhere,) = negative_hardness(model, sampler, torch.device("cpu"))
    np.testing.assert_array_equal(everywhere, np.full(len(scan.slices.images), 64 * 64))
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))  # background everywhere
    (nowhere,) = negative_hardness(model, sampler, torch.device("cpu"))
    assert not nowhere.any() and sampler.hard_count([nowhere]) == 0


def test_training_without_negatives_draws_none():
    assert negative_sampler(TrainConfig()).per_epoch == 0


def test_lung_levels_without_lung_are_nan():
    assert np.isnan(lung_levels(np.zeros((4, 3, 3), dtype=bool))).all()


def test_training_mixes_the_negatives_into_every_epoch(chest_file, tmp_path, labelled_slices):
    """A tiny run on synthetic labelled slices plus the negative scan: each epoch trains on both, the
    history says how many of each, and a held-out scan is not loaded."""
    from covidseg_training.train import train

    config = TrainConfig.from_dict({
        "name": "mix", "data": str(labelled_slices), "output_dir": str(tmp_path / "runs"), "fold": 0, "n_folds": 3,
        "input_size": 64, "base_channels": 4, "depth": 2, "epochs": 2, "batch_size": 4, "threads": 1,
        "device": "cpu",
        "negatives": {"scans": [chest_file.name, "not-there.nii.gz"], "per_epoch": 6, "root": str(chest_file.parent),
                      "holdout": {0: ["not-there.nii.gz"]}},
    })
    run = train(config, log=lambda _: None)
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [row["slices"] for row in history] == [{"labelled": 8, "negative": 6}] * 2
    assert list((tmp_path / "runs" / "cache").glob("negative-chest.nii.gz-*.npz"))


def test_training_with_hard_negatives_records_the_draw(chest_file, tmp_path, labelled_slices):
    """With negatives.hard_share each epoch's record says how many negative slices the model called
    infection on at the epoch's start and how many draws went by it."""
    from covidseg_training.train import train

    config = TrainConfig.from_dict({
        "name": "hard", "data": str(labelled_slices), "output_dir": str(tmp_path / "runs"), "fold": 0, "n_folds": 3,
        "input_size": 64, "base_channels": 4, "depth": 2, "epochs": 2, "batch_size": 4, "threads": 1,
        "device": "cpu", "negatives": {"scans": [chest_file.name], "per_epoch": 6, "root": str(chest_file.parent),
                                       "hard_share": 0.5},
    })
    history = json.loads((train(config, log=lambda _: None) / "history.json").read_text(encoding="utf-8"))
    (scan,) = load_negatives(config.negatives, RECIPE, [chest_file.name])
    for row in history:
        drawn = row["slices"]
        assert drawn["labelled"] == 8 and drawn["negative"] == 6
        assert 0 <= drawn["negative_with_infection"] <= len(scan.slices.images)
        assert drawn["hard_negative"] == (3 if drawn["negative_infection_pixels"] else 0)
        assert (drawn["negative_with_infection"] > 0) == (drawn["negative_infection_pixels"] > 0)


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


def test_loss_without_unknown_lung_is_cross_entropy_plus_dice():
    import torch
    import torch.nn.functional as F

    from covidseg_training.losses import segmentation_loss, soft_dice_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    expected = F.cross_entropy(logits, target) + soft_dice_loss(logits.softmax(1), target, [1, 2])
    assert torch.allclose(segmentation_loss(logits, target), expected, atol=1e-6)


def test_unknown_lung_accepts_lung_or_infection_but_not_background():
    import torch

    from covidseg_training.data import LUNG_UNKNOWN
    from covidseg_training.losses import segmentation_loss

    target = torch.full((1, 4, 4), LUNG_UNKNOWN)
    target[0, 0] = 0  # one row of background keeps the Dice terms defined
    def logits_for(cls):
        logits = torch.full((1, 3, 4, 4), -8.0)
        logits[:, cls] = 8.0
        logits[0, :, 0] = torch.tensor([8.0, -8.0, -8.0])[:, None]
        return logits
    says_lung, says_infection, says_background = (segmentation_loss(logits_for(c), target) for c in (1, 2, 0))
    assert torch.allclose(says_lung, says_infection, atol=1e-5), "either answer is right for unknown lung"
    assert says_background > says_lung + 5, "background inside the lung is wrong"


def test_lung_or_infection_relabels_negative_lungs(chest_file):
    from covidseg_training.data import LUNG_UNKNOWN

    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    lung_pixels = int((scan.slices.labels == LUNG).sum())
    sampler = NegativeSampler([scan], per_epoch=4, lung_label="lung_or_infection")
    labels = sampler.scans[0].slices.labels
    assert lung_pixels and int((labels == LUNG_UNKNOWN).sum()) == lung_pixels and not (labels == LUNG).any()
    with pytest.raises(ValueError, match="lung_label"):
        NegativesConfig(lung_label="maybe")


def test_kernel_augmentation_softens_or_sharpens_and_keeps_the_label():
    from covidseg_training.augment import AugmentConfig, SliceAugmenter

    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(100, 20, (64, 64)), 0, 255).astype(np.uint8)
    label = (rng.random((64, 64)) < 0.3).astype(np.uint8)
    none = AugmentConfig(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=0)
    always = AugmentConfig(flip_p=0, rotate90_p=0, affine_p=0, elastic_p=0, scanner_p=0, kernel_p=1)
    unchanged, kept = SliceAugmenter(none, RECIPE)(image, label)
    np.testing.assert_array_equal(unchanged, image)
    roughness = []
    augmenter = SliceAugmenter(always, RECIPE, seed=1)
    for position in range(20):
        augmenter.reseed(0, position)
        out, out_label = augmenter(image, label)
        np.testing.assert_array_equal(out_label, label)
        roughness.append(np.abs(np.diff(out.astype(float), axis=1)).mean())
    base = np.abs(np.diff(image.astype(float), axis=1)).mean()
    assert min(roughness) < 0.8 * base and max(roughness) > 1.2 * base, "both softer and sharper slices occur"


def test_prepare_caches_a_configs_negatives_for_a_machine_without_them(chest_file, tmp_path):
    """`prepare --negatives-for CONFIG` fills the config's cache; a config whose scans are not on the
    machine then trains from that cache alone."""
    from covidseg_training.__main__ import main as cli

    settings = {"input_size": 64, "output_dir": str(tmp_path / "runs"),
                "negatives": {"scans": [chest_file.name], "per_epoch": 4, "root": str(chest_file.parent)}}
    config_file = tmp_path / "negatives.json"
    config_file.write_text(json.dumps(settings), encoding="utf-8")
    assert cli(["prepare", "--negatives-for", str(config_file), "--preview", str(tmp_path / "taught.png")]) == 0
    assert len(list((tmp_path / "runs" / "cache").glob("negative-chest.nii.gz-*.npz"))) == 1
    assert (tmp_path / "taught.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings["negatives"]["root"] = str(tmp_path / "elsewhere")
    sampler = negative_sampler(TrainConfig.from_dict(settings), log=lambda line: None)
    image, labels = sampler.slice(0, 0)
    assert image.shape == (64, 64) and not (labels == INFECTION).any()


def test_dense_is_dense_lung_and_the_readers_nodules(chest_file, tmp_path):
    """``dense``: classical lung denser than DENSE_LUNG_HU (the chest's vessels), and the readers'
    nodules from an LIDC XML beside the scan, also where the HU rule alone would not mark them."""
    from covidseg_training.negatives import DENSE_LUNG_HU, resize_labels
    from synthetic_lidc import nodule, roi, square, write_read_message

    original = read_image(chest_file)
    canonical = sitk.Cast(to_canonical(original), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(canonical)
    lungs = classical_lung_mask(volume, canonical.GetSpacing()[::-1])
    (plain,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    expected = resize_labels((lungs & (volume > DENSE_LUNG_HU)).astype(np.uint8), RECIPE).astype(bool)
    assert expected.any(), "the synthetic chest has vessels"
    np.testing.assert_array_equal(plain.dense, expected)

    with_reads = tmp_path / "LIDC-like.nii.gz"
    with_reads.write_bytes(chest_file.read_bytes())
    z_mm = original.TransformIndexToPhysicalPoint((0, 0, 20))[2]
    write_read_message(tmp_path / "LIDC-like.nodules.xml", [[nodule("N", [roi(z_mm, square(30, 30, 60, 60))])]])
    (scan,) = load_negatives(NegativesConfig(root=str(tmp_path)), RECIPE, [with_reads.name])
    reads = nodule_mask(parse_nodule_xml(tmp_path / "LIDC-like.nodules.xml"), original).mask
    outlined = resize_labels(reads.astype(np.uint8), RECIPE).astype(bool)
    assert (outlined & ~expected).any(), "the nodule adds pixels the HU rule does not mark"
    np.testing.assert_array_equal(scan.dense, expected | outlined)


def test_no_infection_where_dense_relabels_only_the_aerated_lung(chest_file):
    from covidseg_training.data import LUNG_UNKNOWN

    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    lung = scan.slices.labels == LUNG
    sampler = NegativeSampler([scan], per_epoch=4, lung_label="no_infection_where_dense")
    labels = sampler.scans[0].slices.labels
    np.testing.assert_array_equal(labels == LUNG, scan.dense)
    np.testing.assert_array_equal(labels == LUNG_UNKNOWN, lung & ~scan.dense)
    assert (labels == LUNG_UNKNOWN).sum() > (labels == LUNG).sum() > 0
    assert not (labels == INFECTION).any()


def test_apex_share_draws_from_the_top_of_the_lungs_of_scans_that_hold_it(chest_file):
    """A quarter of the draw goes to the slices at level 0.8-1 of the scans whose lung top lies inside
    the scan, evenly over them; a scan cut off at its lungs (an abdominal scan's bases) gives none.
    Without apex_share the draw is the uniform one as before."""
    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    assert (scan.levels > 1).any(), "the test scan has slices above its lungs"
    top_lung = int(np.flatnonzero(scan.levels <= 1.0)[-1]) + 1
    cut = type(scan)("cut", scan.slices.subset(np.arange(len(scan.levels)) < top_lung), scan.levels[:top_lung],
                     scan.dense[:top_lung])
    sampler = NegativeSampler([scan, cut], per_epoch=400, seed=3, apex_share=0.25)
    apex = set(sampler.apex_rows[0].tolist())
    assert apex == set(np.flatnonzero((scan.levels >= 0.8) & (scan.levels <= 1.0)).tolist()) and apex
    assert not len(sampler.apex_rows[1]), "lungs reaching the scan's top slice: no apex in that scan"
    picks = sampler.epoch(0)
    assert len(picks) == 400 and sampler.apex_count() == 100
    uniform, drawn_apex = picks[:300], picks[300:]
    assert np.bincount([s for s, _ in uniform]).tolist() == [150, 150]
    assert {s for s, _ in drawn_apex} == {0} and {i for _, i in drawn_apex} == apex
    assert sampler.epoch(0) == picks, "reproducible for a resumed run"
    plain = NegativeSampler([scan, cut], per_epoch=400, seed=3)
    assert plain.apex_count() == 0 and len(plain.epoch(0)) == 400
    assert NegativeSampler([cut], per_epoch=400, apex_share=0.25).apex_count() == 0, "no apex anywhere"
    with pytest.raises(ValueError, match="apex_share"):
        NegativesConfig(apex_share=-0.1)
    with pytest.raises(ValueError, match="hard_share \\+ apex_share"):
        NegativesConfig(hard_share=0.6, apex_share=0.5)
    with pytest.raises(ValueError, match="apex_level"):
        NegativesConfig(apex_level=1.0)


def test_training_log_states_the_apex_draw(chest_file, tmp_path):
    config = TrainConfig.from_dict({"output_dir": str(tmp_path), "negatives": {
        "scans": [chest_file.name], "per_epoch": 8, "root": str(chest_file.parent), "apex_share": 0.5}})
    lines = []
    sampler = negative_sampler(config, log=lines.append)
    assert sampler.apex_count() == 4
    assert f"4 of them drawn from the {len(sampler.apex_rows[0])} apex slices" in lines[0]


def test_preview_shows_apex_mid_and_base_and_no_apex_where_the_lungs_reach_the_top(chest_file):
    from covidseg_training.figures import negative_preview_slices

    (scan,) = load_negatives(NegativesConfig(root=str(chest_file.parent)), RECIPE, [chest_file.name])
    apex, mid, base = negative_preview_slices(scan.levels, scan.slices.labels)
    assert 0.8 <= scan.levels[apex] <= 1.0 and 0.3 <= scan.levels[mid] <= 0.8 and 0.0 <= scan.levels[base] <= 0.1
    top = int(np.flatnonzero(scan.levels <= 1.0)[-1]) + 1
    cut_apex, cut_mid, _ = negative_preview_slices(scan.levels[:top], scan.slices.labels[:top])
    assert cut_apex is None and cut_mid == mid
