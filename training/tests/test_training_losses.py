"""The infection's Dice term as a Tversky index (``infection_missed_weight``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from covidseg_training.config import TrainConfig
from covidseg_training.data import INFECTION, LUNG
from covidseg_training.losses import deep_supervision_loss, segmentation_loss, soft_dice_loss
from covidseg_training.train import train


def _one_hot(target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()


def test_tversky_term_is_the_formula_and_half_is_the_dice():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, :2] = INFECTION  # 8 infection pixels
    probabilities = _one_hot(torch.zeros_like(target))
    probabilities[0, :, 0] = torch.tensor([0.0, 0.0, 1.0])[:, None]  # 4 found
    probabilities[0, :, 3, :2] = torch.tensor([0.0, 0.0, 1.0])[:, None]  # 2 false
    tp, fp, fn = 4.0, 2.0, 4.0
    for beta in (0.5, 0.7, 0.9):
        expected = 1 - (2 * tp + 1) / (2 * (tp + (1 - beta) * fp + beta * fn) + 1)
        got = soft_dice_loss(probabilities, target, [INFECTION], missed_weight={INFECTION: beta})
        assert got.item() == pytest.approx(expected, abs=1e-6)
    dice = 1 - (2 * tp + 1) / (2 * tp + fp + fn + 1)
    assert soft_dice_loss(probabilities, target, [INFECTION]).item() == pytest.approx(dice, abs=1e-6)


def test_above_half_a_missed_pixel_costs_more_than_a_false_one():
    target = torch.full((1, 4, 4), LUNG, dtype=torch.long)
    target[0, 1:3, 1:3] = INFECTION  # 4 infection pixels
    missed = target.clone()
    missed[0, 1, 1] = LUNG  # one infection pixel called lung
    false = target.clone()
    false[0, 0, 0] = INFECTION  # one lung pixel called infection
    def infection_term(called: torch.Tensor, weight: float) -> float:
        return soft_dice_loss(_one_hot(called), target, [INFECTION], missed_weight={INFECTION: weight}).item()
    def gap(weight: float) -> float:  # what the missed pixel costs beyond the false one
        return infection_term(missed, weight) - infection_term(false, weight)
    assert gap(0.3) < 0 < gap(0.7) and gap(0.7) > gap(0.5) + 0.05
    # segmentation_loss and the deep-supervision loss pass the weight on; with it the missed pixel's loss grows
    # while the false pixel's falls.
    def loss(called: torch.Tensor, weight: float) -> float:
        return deep_supervision_loss([20 * _one_hot(called) - 10], target, infection_missed_weight=weight).item()
    assert loss(missed, 0.7) > loss(missed, 0.5) + 0.01 and loss(false, 0.7) < loss(false, 0.5) - 0.01
    assert loss(missed, 0.7) == pytest.approx(
        segmentation_loss(20 * _one_hot(missed) - 10, target, infection_missed_weight=0.7).item())


def test_training_uses_the_configured_weight(tmp_path, labelled_slices):
    def first_loss(name: str, weight: float) -> float:
        config = TrainConfig.from_dict({
            "name": name, "data": str(labelled_slices), "output_dir": str(tmp_path / "runs"), "fold": 0,
            "n_folds": 3, "input_size": 64, "base_channels": 4, "depth": 3, "epochs": 1, "batch_size": 4,
            "threads": 1, "device": "cpu", "infection_missed_weight": weight,
        })
        run = train(config, log=lambda _: None)
        return json.loads((run / "history.json").read_text(encoding="utf-8"))[0]["loss"]
    # Same seed, same batches: only the weight differs.
    assert first_loss("dice", 0.5) != pytest.approx(first_loss("tversky", 0.8), abs=1e-4)


def test_the_tversky_screen_config_weighs_missed_infection():
    config = TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / "v2_dense_late_masses_halo_hardneg_tversky.yaml")
    assert config.infection_missed_weight == 0.7 and TrainConfig().infection_missed_weight == 0.5
