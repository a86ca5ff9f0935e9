"""Average the weights of a run's kept epochs (``epochNN.pt``) into one checkpoint.

A run's last epochs differ on whole scans more than their validation Dice says (results/v2/README.md:
fold 0's epochs 26-30 call 74-79 mL infection on a healthy scan), and the best epoch is picked by a
score on four or five held-out cases. The mean of the kept epochs' weights (stochastic weight averaging,
Izmailov et al. 2018) is one model from the whole end of the run instead. Its batch-norm statistics
are the kept epochs' statistics averaged. ``--recalibrate`` measures them again instead, as SWA does,
over one epoch of the run's own augmented training batches; on fold 2's epoch-8 checkpoint (weights
unchanged) that moved the validation infection Dice from 0.597 to 0.534 (0.529 on unaugmented slices),
so it is not the default. The result is a ``best.pt``-style checkpoint that ``evaluate``, ``export`` and
``wholescan`` take as they are; its record holds the averaged epochs and its validation Dice.

    python -m covidseg_training average runs/NAME/fold2/epoch2[6-9].pt runs/NAME/fold2/epoch30.pt \\
        --out runs/NAME/fold2/averaged.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .checkpoint import model_with_weights
from .config import TrainConfig
from .data import with_context
from .train import (epoch_batches, labelled_indices, load_dataset, negative_sampler, network_batch, per_case_dice,
                    predict_labels, save_atomic, split)

# What must be the same in every averaged checkpoint: the network's shape and the run it came from.
SAME_RUN_KEYS = ("name", "fold", "seed", "channels", "base_channels", "depth", "context_slices", "data")


def read_kept_epoch(path: Path) -> dict:
    """One ``epochNN.pt`` (or ``best.pt``): its weights, config and record; a ValueError if it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    content = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(content, dict) or "model" not in content or "config" not in content:
        raise ValueError(f"{path}: not a kept epoch or best.pt (needs 'model' and 'config'; "
                         "last.pt holds no config)")
    return content


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors; counters (batch norm's ``num_batches_tracked``)
    are taken from the last state. All states must have the same keys and shapes."""
    names = list(states[0])
    for index, state in enumerate(states[1:], start=2):
        if list(state) != names:
            raise ValueError(f"checkpoint {index} has other weights than checkpoint 1")
    averaged = {}
    for name in names:
        tensors = [state[name] for state in states]
        if any(tensor.shape != tensors[0].shape for tensor in tensors):
            raise ValueError(f"{name}: shapes differ between the checkpoints")
        if tensors[0].is_floating_point():
            averaged[name] = torch.stack([tensor.double() for tensor in tensors]).mean(0).to(tensors[0].dtype)
        else:
            averaged[name] = tensors[-1].clone()
    return averaged


def check_same_run(configs: list[dict], paths: list[Path]) -> None:
    """A ValueError naming the first checkpoint whose run differs from the first one's."""
    for config, path in zip(configs[1:], paths[1:]):
        differing = [key for key in SAME_RUN_KEYS if config.get(key) != configs[0].get(key)]
        if differing:
            raise ValueError(f"{path}: not from the same run as {paths[0]} ({', '.join(differing)} differ); "
                             "average only the kept epochs of one run")


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Measure every batch norm's running mean and variance again over ``batches`` (uint8 slices or stacks),
    as a cumulative average over all of them; returns (batch-norm layers reset, inputs seen)."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average: every batch counts the same
    model.train()
    seen = 0
    for images in batches:
        model(network_batch(images))
        seen += len(images)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return len(layers), seen


def training_batches(config: TrainConfig, epoch: int, log=print) -> Iterator[torch.Tensor]:
    """The uint8 image batches of one training epoch of the run: its labelled training slices and its
    negative slices (drawn uniformly), with the augmentation and draws of epoch ``epoch`` (1-based, as in
    the history), in an order of their own."""
    train_set, _ = split(config, load_dataset(config))
    inputs = with_context(train_set, config.context_slices)
    slices = [(inputs[i], train_set.labels[i]) for i in labelled_indices(train_set.cases, config, epoch - 1)]
    negative, levels = [False] * len(slices), [float("nan")] * len(slices)
    negatives = negative_sampler(config, log)
    if negatives.per_epoch:
        picks = negatives.epoch(epoch - 1)
        slices += [negatives.slice(*pick) for pick in picks]
        negative += [True] * len(picks)
        levels += [negatives.level(*pick) for pick in picks]
    steps = max(1, len(slices) // config.batch_size)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(slices))  # negatives spread over batches
    batches = epoch_batches([slices[i] for i in order], config, epoch - 1, steps, [negative[i] for i in order],
                            levels=[levels[i] for i in order])
    return (images for images, _labels in batches)


def validation_split(config: TrainConfig):
    """The run's held-out labelled slices (None when it trained on all data)."""
    return None if config.fold is None else split(config, load_dataset(config))[1]


def average_checkpoints(paths: list[Path], out: Path, recalibrate: bool = False, log=print) -> dict:
    """Average ``paths`` (kept epochs of one run) into ``out``; returns the saved record."""
    if len(paths) < 2:
        raise ValueError("average needs at least two checkpoints")
    if len({path.resolve() for path in paths}) < len(paths):
        raise ValueError("a checkpoint is named twice; average each kept epoch once")
    if out.resolve() in {path.resolve() for path in paths}:
        raise ValueError(f"{out}: would overwrite one of the averaged checkpoints; choose another --out")
    contents = [read_kept_epoch(path) for path in paths]
    configs = [content["config"] for content in contents]
    check_same_run(configs, paths)
    config = TrainConfig.from_dict(configs[-1])
    state = average_state_dicts([content["model"] for content in contents])
    model = model_with_weights(state, config, str(paths[0]))
    epochs = [int(content.get("record", {}).get("epoch", 0)) for content in contents]
    record = {"averaged_epochs": epochs, "averaged_from": [str(path) for path in paths],
              "batch_norm": "averaged"}
    if recalibrate:
        layers, seen = recalibrate_batch_norm(model, training_batches(config, max(1, *epochs), log))
        record["batch_norm"] = f"measured again on one augmented training epoch ({seen} inputs, {layers} layers)"
    val_set = validation_split(config)
    if val_set is not None and len(val_set.images):
        predicted = predict_labels(model, with_context(val_set, config.context_slices), torch.device("cpu"))
        record.update(per_case_dice(predicted, val_set.labels, val_set.cases))
    # Saved without auxiliary heads: the averaged model is for evaluation and export, not for more training.
    save_atomic({"model": model.state_dict(), "config": config.to_dict(), "record": record}, out)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="kept epochs (epochNN.pt) of one run")
    parser.add_argument("--out", type=Path, required=True, help="the averaged checkpoint to write")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure the batch-norm statistics again on an epoch of training batches "
                             "instead of averaging them")
    args = parser.parse_args(argv)
    try:
        record = average_checkpoints(args.checkpoints, args.out, recalibrate=args.recalibrate,
                                     log=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as error:
        print(f"average: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
