"""One YAML file per experiment, read into a dataclass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from CovidInfectionSegLib.preprocessing import IntensityRecipe

from .augment import PAINTED_INTO_ONE_SLICE, AugmentConfig
from .negatives import NegativesConfig


@dataclass
class TrainConfig:
    name: str = "experiment"
    data: str = ""  # .npz written by `prepare`, or a PNG-export folder; empty = the shared PNG export
    output_dir: str = "runs"
    seed: int = 0
    n_folds: int = 5
    fold: int | None = None  # validation fold; None trains on everything with no validation
    input_size: int = 256  # slice size in pixels (square); the data must match, the manifest records it
    base_channels: int = 16
    depth: int = 4
    epochs: int = 40
    batch_size: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    dice_weight: float = 1.0
    tv_weight: float = 0.0
    # The infection's Dice term as a Tversky index, TP / (TP + (1 - w) FP + w FN) (losses.soft_dice_loss):
    # 0.5 is the Dice; above it a missed infection pixel costs more than a false one (the recall that the
    # cross-validation's low-recall cases lack: fold 2's precision 0.88, recall 0.40 at 2.2.0's recipe).
    infection_missed_weight: float = 0.5
    # Deep supervision: auxiliary heads on the decoder's coarser outputs, trained against subsampled
    # labels (0: none); training only, an exported model has none (see unet.UNet2D).
    deep_supervision: int = 0
    patience: int = 10
    # Which epoch becomes best.pt (the fold model that is evaluated, exported and checked on whole scans):
    # "best", the best validation score, picked on the fold's own held-out cases (an optimistic estimate);
    # or "last", the rule an all-data model follows, picked by no held-out case (no early stopping then).
    keep_epoch: str = "best"
    # From this epoch on, each epoch's weights are also kept as epochNN.pt (best.pt's format), so the
    # whole-scan figures can be measured over the run's last epochs, not only at one checkpoint; 0: off.
    keep_from_epoch: int = 0
    device: str = "auto"
    threads: int = 0  # 0 = torch default
    workers: int = 0  # processes preparing augmented batches (0: the training process itself)
    # torch.compile the training step's forward (and so its backward): the same function, fused; 8-10%
    # faster a step on a 2-core CPU in float32 (benchmarks/train_step.py); needs a C++ compiler on the
    # CPU. Validation, the hardness pass and every saved checkpoint use the plain model.
    compile: bool = False
    max_train_slices: int = 0  # 0 = all (tests use a handful)
    # Per-case weighting by sampling: each epoch draws as many labelled slices as there are, with
    # replacement, each case equally likely (a case with many infected slices no longer dominates).
    case_balanced: bool = False
    init_from: str = ""  # start from these weights (best.pt or an exported TorchScript .pt); empty = random
    init_widen: bool = False  # init_from may be narrower: widened to base_channels computing the same (widen.py)
    # Context across slices (2.5D): the network sees this many neighbours on each side of a slice as
    # extra channels (0: the slice alone). Labelled slices take their neighbours from the PNG export
    # (data.slice_neighbours), negatives from their scan; ``context_mm`` goes into the manifest, where
    # the engine takes the slice nearest to it (at least the next one) as the neighbour.
    context_slices: int = 0
    context_mm: float = 3.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    negatives: NegativesConfig = field(default_factory=NegativesConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        values = dict(values)
        augment = AugmentConfig(**values.pop("augment", {}) or {})
        negatives = dict(values.pop("negatives", {}) or {})
        if "holdout" in negatives:
            negatives["holdout"] = {int(fold): list(names) for fold, names in negatives["holdout"].items()}
        negatives = NegativesConfig(**negatives)
        for key, value in vars(augment).items():  # YAML ranges come as lists
            if isinstance(value, list):
                setattr(augment, key, tuple(value))
        config = cls(augment=augment, negatives=negatives, **values)
        config.recipe()  # raises for a negative context
        if config.keep_epoch not in ("best", "last"):
            raise ValueError(f"keep_epoch must be 'best' or 'last', not {config.keep_epoch!r}")
        for key, painted in PAINTED_INTO_ONE_SLICE.items():
            if config.context_slices and getattr(config.augment, key):
                raise ValueError(f"augment.{key} with context_slices: it paints {painted} into one slice "
                                 f"only, so a neighbour would show none; set {key} to 0 for a context model")
        if config.augment.mass_p and config.augment.mass_from_epoch > config.epochs:
            raise ValueError(f"augment.mass_from_epoch {config.augment.mass_from_epoch} is after the last epoch "
                             f"({config.epochs}): no epoch would get the masses")
        return config

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(yaml.safe_load(handle) or {})

    @property
    def channels(self) -> int:
        """The network's input channels: the slice and its neighbours."""
        return self.recipe().channels

    def recipe(self) -> IntensityRecipe:
        """The intensity recipe a model of this config is exported with (its context included)."""
        return IntensityRecipe(input_size=self.input_size, context_slices=self.context_slices,
                               context_mm=self.context_mm if self.context_slices else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def override(self, **values: Any) -> "TrainConfig":
        """Set the given fields, skipping those given as None or "" (command-line options left out)."""
        known = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown config key: {key}")
            if value is not None and value != "":
                setattr(self, key, value)
        return self
