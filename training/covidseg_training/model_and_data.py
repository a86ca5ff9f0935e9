"""Which model and which validation slices an evaluation command runs on (shared by evaluate,
robustness and crossval, so none of them imports another)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from CovidInfectionSegLib.checksums import sha256_of

from .checkpoint import load_network
from .config import TrainConfig
from .data import SliceDataset
from .predict import FlipAveraged
from .train import load_dataset, split

# The PNG export dropped the pixel size: assume a 350 mm field of view over 256 pixels.
DEFAULT_FOV_MM = 350.0
DEFAULT_PIXEL_MM = DEFAULT_FOV_MM / 256


def validation_set(config: TrainConfig) -> SliceDataset:
    """The slices of ``config.fold`` in the config's patient-grouped split."""
    if config.fold is None:
        raise ValueError(f"config {config.name!r} has no validation fold (fold: null); pass --fold K")
    _, validation = split(config, load_dataset(config))
    assert validation is not None
    return validation


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by evaluate and robustness: which model, which data, where to write."""
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="best.pt from train, or an exported .pt/.json model package")
    parser.add_argument("--config", type=Path,
                        help="experiment YAML (default: the config stored in the checkpoint; required for a package)")
    parser.add_argument("--fold", type=int, help="validation fold (overrides the config)")
    parser.add_argument("--data", help="prepared .npz or PNG-export folder (overrides the config)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--flip-tta", action="store_true",
                        help="flip test-time augmentation: each slice averaged with its left-right mirror, as "
                             "covidseg segment --flip-tta does")


def evaluated_file(path: Path) -> dict[str, str]:
    """Which file was evaluated, by path and sha256 (export refuses metrics of a different file)."""
    return {"evaluated_file": str(path), "evaluated_sha256": sha256_of(Path(path))}


def resolve_model_and_data(args: argparse.Namespace) -> tuple[torch.nn.Module, SliceDataset, dict[str, Any]]:
    network, stored_config, description, epoch = load_network(args.checkpoint)
    if args.config:
        config = TrainConfig.load(args.config)
    elif stored_config is not None:
        config = stored_config
    else:
        raise SystemExit(f"{args.checkpoint}: a model package carries no training config; pass --config")
    if args.fold is not None:
        config.fold = args.fold
    if args.data:
        config.data = args.data
    dataset = validation_set(config)
    if args.flip_tta:
        network = FlipAveraged(network)
    meta = {"model": description, **evaluated_file(args.checkpoint), "evaluated_epoch": epoch,
            "flip_tta": args.flip_tta, "config": str(args.config) if args.config else "stored in the checkpoint",
            "data": config.data or "shared PNG export (ma2020-covid19-ct-png)", "fold": config.fold,
            "n_folds": config.n_folds, "split_seed": config.seed}
    return network, dataset, meta
