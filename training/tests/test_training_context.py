"""Context across slices (a 2.5D input, ``context_slices``): neighbours from the labelled data and from
the negative scans, augmented alike, a single-slice network as the start, and a trained context model
that exports a package the engine runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.pipeline import segment_image
from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training.augment import AugmentConfig, SliceAugmenter
from covidseg_training.checkpoint import with_context_channels
from covidseg_training.config import TrainConfig
from covidseg_training.data import LUNG, SliceDataset, context_stacks, with_context
from covidseg_training.negatives import NegativeSampler, NegativeScan
from covidseg_training.unet import UNet2D
from whole_chest import SHAPE, chest_image

NO_AUGMENTATION = {"flip_p": 0.0, "rotate90_p": 0.0, "affine_p": 0.0, "elastic_p": 0.0, "scanner_p": 0.0,
                   "zflip_p": 0.0}


def numbered_slices(count: int, size: int = 8) -> np.ndarray:
    """Slice i filled with the value i, so a stack shows which slices it holds."""
    return np.repeat(np.arange(count, dtype=np.uint8), size * size).reshape(count, size, size)


def test_context_stacks_follow_the_neighbours_and_repeat_where_they_end() -> None:
    images = numbered_slices(5)
    neighbours = np.array([[-1, 1], [0, 2], [1, -1], [-1, 4], [3, -1]])  # two runs: 0-2 and 3-4
    stacks = context_stacks(images, neighbours, 2)
    assert stacks.shape == (5, 5, 8, 8)
    assert stacks[:, :, 0, 0].tolist() == [[0, 0, 0, 1, 2], [0, 0, 1, 2, 2], [0, 1, 2, 2, 2],
                                           [3, 3, 3, 4, 4], [3, 3, 4, 4, 4]]


def test_with_context_takes_neighbours_of_one_case_with_overlapping_lungs() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    labels[:, 2:6, 2:6] = LUNG
    dataset = SliceDataset(numbered_slices(4), labels, np.array(["a", "a", "a", "b"]))
    assert with_context(dataset, 0) is dataset.images
    assert with_context(dataset, 1)[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 2], [3, 3, 3]]


def test_a_stack_is_augmented_alike_on_every_channel() -> None:
    """Identical channels stay identical through geometry, harmonisation, kernel and scanner steps
    (their noise aside): one geometry and the same draws for each channel."""
    rng = np.random.default_rng(3)
    image = cv2_smooth(rng.integers(0, 255, (64, 64)).astype(np.uint8))
    label = np.zeros((64, 64), dtype=np.uint8)
    label[10:54, 8:56] = LUNG
    config = AugmentConfig(affine_p=1.0, elastic_p=1.0, harmonise_p=1.0, kernel_p=1.0, scanner_p=1.0,
                           noise_p=0.0, downsample_p=1.0, blur_p=1.0, gamma_p=1.0, window_p=1.0)
    augmenter = SliceAugmenter(config, IntensityRecipe(input_size=64), seed=0)
    changed = 0
    for position in range(6):
        augmenter.reseed(0, position)
        stack, out_label = augmenter(np.stack([image] * 3), label)
        assert stack.shape == (3, 64, 64) and stack.dtype == np.uint8 and out_label.shape == (64, 64)
        np.testing.assert_array_equal(stack[0], stack[1])
        np.testing.assert_array_equal(stack[2], stack[1])
        changed += not np.array_equal(stack[1], image)
    assert changed == 6


def cv2_smooth(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 2.0)


def test_zflip_reverses_the_neighbours_only() -> None:
    stack = numbered_slices(3, size=64) * 50
    label = np.zeros((64, 64), dtype=np.uint8)
    flipping = SliceAugmenter(AugmentConfig(**{**NO_AUGMENTATION, "zflip_p": 1.0}), IntensityRecipe(input_size=64))
    flipped, _ = flipping(stack, label)
    np.testing.assert_array_equal(flipped, stack[::-1])
    keeping = SliceAugmenter(AugmentConfig(**NO_AUGMENTATION), IntensityRecipe(input_size=64))
    np.testing.assert_array_equal(keeping(stack, label)[0], stack)


def test_masses_with_context_are_refused() -> None:
    with pytest.raises(ValueError, match="mass_p to 0 for a context model"):
        TrainConfig.from_dict({"context_slices": 1, "augment": {"mass_p": 0.3}})
    assert TrainConfig.from_dict({"context_slices": 1}).channels == 3
    assert TrainConfig.from_dict({"context_slices": 1}).recipe().to_manifest()["context_mm"] == 3.0
    assert "context_slices" not in TrainConfig.from_dict({}).recipe().to_manifest()


def test_a_single_slice_network_starts_a_context_model_computing_the_same() -> None:
    torch.manual_seed(0)
    single = UNet2D(in_channels=1, base_channels=4, depth=2).eval()
    context = UNet2D(in_channels=3, base_channels=4, depth=2).eval()
    context.load_state_dict(with_context_channels(single.state_dict(), 3))
    stack = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(context(stack), single(stack[:, 1:2]))


def test_negative_slices_come_with_their_scan_neighbours() -> None:
    images = numbered_slices(4)
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    scan = NegativeScan("s", SliceDataset(images, labels, np.full(4, "s")), np.linspace(0, 1, 4),
                        np.zeros((4, 8, 8), bool))
    sampler = NegativeSampler([scan], per_epoch=2, context_slices=1)
    stack, label = sampler.slice(0, 3)
    assert stack[:, 0, 0].tolist() == [2, 3, 3] and label.shape == (8, 8)
    assert sampler.inputs(0)[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    assert NegativeSampler([scan], per_epoch=2).slice(0, 3)[0].shape == (8, 8)


def test_a_trained_context_model_exports_a_package_the_engine_runs(tmp_path, labelled_slices) -> None:
    """Two epochs with neighbours in the labelled slices and in a negative scan (hard negatives, so the
    hardness pass reads stacks too), exported: the manifest says 3 channels and the engine segments."""
    from covidseg_training.__main__ import main as cli
    from covidseg_training.train import train

    image = chest_image(origin_xyz=(0.0, 0.0, 0.0))
    sitk.WriteImage(image, str(tmp_path / "chest.nii.gz"))
    config = TrainConfig.from_dict({
        "name": "context", "data": str(labelled_slices), "output_dir": str(tmp_path / "runs"), "fold": 0,
        "n_folds": 3, "input_size": 64, "base_channels": 4, "depth": 2, "epochs": 2, "batch_size": 4,
        "threads": 1, "device": "cpu", "context_slices": 1, "context_mm": 2.5,
        "negatives": {"scans": ["chest.nii.gz"], "per_epoch": 4, "root": str(tmp_path), "hard_share": 0.5},
    })
    run = train(config, log=lambda _: None)
    history = json.loads((run / "history.json").read_text(encoding="utf-8"))
    assert [row["slices"]["negative"] for row in history] == [4, 4]
    assert all(0.0 <= row["infection_dice"] <= 1.0 for row in history)
    assert cli(["evaluate", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_slices"] == 4 and set(summary["robustness"]) >= {"as_is", "degraded"}
    assert cli(["export", "--checkpoint", str(run / "best.pt"), "--out", str(tmp_path / "models"),
                "--name", "context_unet", "--version", "0.0.1"]) == 0
    manifest = json.loads((tmp_path / "models" / "context_unet.json").read_text(encoding="utf-8"))
    assert manifest["input"]["channels"] == 3 and manifest["architecture"]["in_channels"] == 3
    assert manifest["recipe"]["context_slices"] == 1 and manifest["recipe"]["context_mm"] == 2.5
    package = load_model_package(tmp_path / "models" / "context_unet.json")
    result = segment_image(image, package, device="cpu")
    assert sitk.GetArrayFromImage(result.labelmap).shape == SHAPE
