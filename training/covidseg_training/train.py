"""Train the 2D U-Net on prepared slices: AdamW + warm-up/cosine schedule, early stopping, mixed
precision where the hardware has it (:func:`precision_for`), augmented batches prepared by worker
processes, and a checkpoint every epoch so a killed run resumes where it stopped.

    python -m covidseg_training.train training/configs/v1.yaml [--fold K] [--epochs N] [--stop-after N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from CovidInfectionSegLib.atomic import atomic_path, write_text_atomic
from CovidInfectionSegLib.inference import cuda_has_native_bf16
from CovidInfectionSegLib.preprocessing import IntensityRecipe

from .augment import SliceAugmenter
from .checkpoint import initial_state
from .config import TrainConfig
from .data import INFECTION, LUNG, SliceDataset, load_png_export, patient_folds, with_context
from .losses import deep_supervision_loss
from .negatives import NegativeSampler, load_negatives
from .unet import UNet2D


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_dataset(config: TrainConfig) -> SliceDataset:
    if config.data and config.data.endswith(".npz"):
        return SliceDataset.load(Path(config.data))
    return load_png_export(Path(config.data)) if config.data else load_png_export()


def split(config: TrainConfig, dataset: SliceDataset) -> tuple[SliceDataset, SliceDataset | None]:
    if config.fold is None:
        return dataset, None
    folds = patient_folds(dataset.cases, config.n_folds, config.seed)
    return dataset.subset(folds != config.fold), dataset.subset(folds == config.fold)


def precision_for(device: torch.device) -> torch.dtype:
    """Mixed precision where the hardware has it: bf16 on CUDA (fp16 with loss scaling on GPUs without
    native bf16) and on CPUs with native bf16; float32 on other CPUs, where bf16 is emulated and slower."""
    if device.type == "cuda":
        return torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def autocast(device: torch.device):
    dtype = precision_for(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


class AugmentedSlices(torch.utils.data.Dataset):
    """One epoch's training slices in training order, each augmented by a generator seeded with (seed,
    epoch, position): the batches do not depend on how many loader workers draw them, nor on whether
    the run was resumed. ``negative[i]`` says slice i is a whole-scan negative (none are by default),
    ``levels[i]`` where a negative slice lies in its scan's lung (NaN where unknown). A slice is (H, W), or
    (C, H, W) with its neighbours (``context_slices``)."""

    def __init__(self, slices: list[tuple[np.ndarray, np.ndarray]], config: TrainConfig, epoch: int,
                 negative: list[bool] | None = None, levels: list[float] | None = None):
        self.slices = slices
        self.negative = negative or [False] * len(slices)
        self.levels = levels or [float("nan")] * len(slices)
        self.config = config
        self.epoch = epoch
        self._augmenter: SliceAugmenter | None = None

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._augmenter is None:  # one per worker process
            recipe = IntensityRecipe(input_size=self.config.input_size)
            self._augmenter = SliceAugmenter(self.config.augment.in_epoch(self.epoch + 1), recipe, seed=self.config.seed)
        self._augmenter.reseed(self.epoch, position)
        image, label = self._augmenter(*self.slices[position], negative=self.negative[position],
                                       level=self.levels[position])
        return torch.from_numpy(image), torch.from_numpy(label)


def epoch_batches(slices: list[tuple[np.ndarray, np.ndarray]], config: TrainConfig, epoch: int,
                  steps: int, negative: list[bool] | None = None,
                  device: torch.device = torch.device("cpu"), levels: list[float] | None = None,
                  ) -> torch.utils.data.DataLoader:
    """``steps`` batches of augmented slices, prepared by ``config.workers`` processes (0: this one);
    ``negative`` flags the whole-scan negatives among ``slices``, ``levels`` where they lie in their scan's
    lung; batches for a GPU ``device`` are pinned."""
    kept = steps * config.batch_size
    dataset = AugmentedSlices(slices[:kept], config, epoch, None if negative is None else negative[:kept],
                              None if levels is None else levels[:kept])
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                       num_workers=config.workers, persistent_workers=False,
                                       pin_memory=device.type == "cuda")


@torch.inference_mode()
def predict_labels(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32) -> np.ndarray:
    """uint8 images (N, H, W), or stacks with neighbours (N, C, H, W) -> predicted label maps (N, H, W)."""
    model.eval()
    out = np.empty((len(images), *images.shape[-2:]), dtype=np.uint8)
    for start in range(0, len(images), batch_size):
        batch = network_batch(torch.from_numpy(images[start : start + batch_size])).to(device)
        with autocast(device):
            logits = model(batch)
        out[start : start + batch_size] = logits.argmax(1).cpu().numpy()
    return out


def network_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 slices (N, H, W) or stacks (N, C, H, W) -> float (N, C, H, W) in [0, 1]."""
    images = images.float().div(255)
    return images.unsqueeze(1) if images.dim() == 3 else images


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    denominator = prediction.sum() + truth.sum()
    return 1.0 if denominator == 0 else float(2 * np.logical_and(prediction, truth).sum() / denominator)


def per_case_dice(predicted: np.ndarray, labels: np.ndarray, cases: np.ndarray) -> dict[str, float]:
    """Mean over patients of Dice for lung (lung or infection) and infection, pooled per patient."""
    lung, infection = [], []
    for case in np.unique(cases):
        sel = cases == case
        lung.append(dice(predicted[sel] >= LUNG, labels[sel] >= LUNG))
        infection.append(dice(predicted[sel] == INFECTION, labels[sel] == INFECTION))
    return {"lung_dice": float(np.mean(lung)), "infection_dice": float(np.mean(infection))}


def labelled_indices(cases: np.ndarray, config: TrainConfig, epoch: int) -> np.ndarray:
    """The labelled slices of an epoch: each once, or with ``case_balanced`` as many drawn with
    replacement so that every case is equally likely (the draw depends only on seed and epoch)."""
    if not config.case_balanced:
        return np.arange(len(cases))
    _names, case_of, per_case = np.unique(cases, return_inverse=True, return_counts=True)
    weights = 1.0 / per_case[case_of]
    rng = np.random.default_rng([config.seed, epoch, 1])
    return rng.choice(len(cases), size=len(cases), replace=True, p=weights / weights.sum())


def learning_rate_at(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    warmup = max(1, config.warmup_epochs * steps_per_epoch)
    total = max(warmup + 1, config.epochs * steps_per_epoch)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def negative_sampler(config: TrainConfig, log=print) -> NegativeSampler:
    """The negative slices this run trains on: the config's scans minus the fold's held-out ones
    (none when ``negatives.per_epoch`` is 0). Prepared slices are cached beside the runs."""
    if not config.negatives.per_epoch:
        return NegativeSampler([], 0)
    names = config.negatives.scans_for_fold(config.fold)
    recipe = IntensityRecipe(input_size=config.input_size)
    scans = load_negatives(config.negatives, recipe, names, cache_dir=Path(config.output_dir) / "cache")
    sampler = NegativeSampler(scans, config.negatives.per_epoch, seed=config.seed,
                              lung_label=config.negatives.lung_label, hard_share=config.negatives.hard_share,
                              context_slices=config.context_slices, apex_share=config.negatives.apex_share,
                              apex_level=config.negatives.apex_level)
    apex = sampler.apex_count()
    apex_slices = sum(len(rows) for rows in sampler.apex_rows)
    log(f"negatives: {config.negatives.per_epoch} slices per epoch from {', '.join(names)} "
        f"({sum(len(scan.slices.images) for scan in scans)} slices)"
        + (f", {apex} of them drawn from the {apex_slices} apex slices" if apex else ""))
    return sampler


def negative_hardness(model: torch.nn.Module, negatives: NegativeSampler, device: torch.device) -> list[np.ndarray]:
    """Per negative scan, the infection pixels ``model`` calls on each slice: all of them false, since
    no negative slice holds infection. The hard-negative draw (``negatives.hard_share``) weighs by it."""
    return [(predict_labels(model, negatives.inputs(index), device) == INFECTION).sum(axis=(1, 2)).astype(np.float64)
            for index in range(len(negatives.scans))]


def hard_negative_record(negatives: NegativeSampler, hardness: list[np.ndarray] | None) -> dict:
    """For an epoch's history record: how many negative draws went by hardness, and how many negative
    slices the model called any infection on at the epoch's start (with how many pixels in all)."""
    if hardness is None:
        return {}
    return {"hard_negative": negatives.hard_count(hardness),
            "negative_with_infection": int(sum(int(np.count_nonzero(h)) for h in hardness)),
            "negative_infection_pixels": int(sum(float(np.sum(h)) for h in hardness))}


def save_atomic(content: dict, path: Path) -> None:
    """torch.save under a temporary name, then rename: a reader (evaluate, export) never sees half a file."""
    with atomic_path(path) as temporary:
        torch.save(content, temporary)


def run_dir(config: TrainConfig) -> Path:
    suffix = "all" if config.fold is None else f"fold{config.fold}"
    return Path(config.output_dir) / config.name / suffix


def resume_point(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 state: dict) -> dict:
    """What ``last.pt`` holds: enough to go on exactly where the run stopped, the fp16 loss scale included."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "state": state}


def resume(checkpoint: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler) -> dict:
    """Load a ``resume_point`` into the run's objects; returns the run's state. A ``last.pt`` written before
    the loss scale was kept has none: the scaler then starts again from its initial scale."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return checkpoint["state"]


def training_forward(model: UNet2D, config: TrainConfig, device: torch.device):
    """What the training step calls on a batch: the logits of every head that the loss reads (the
    full-size head, then the auxiliary ones with deep supervision), as a list; compiled by torch.compile
    with ``config.compile``. The model itself stays plain, so its weights save and load as before."""
    def full_size(images: torch.Tensor) -> list[torch.Tensor]:
        return [model(images)]

    forward = model.forward_deep if config.deep_supervision else full_size
    if not config.compile:
        return forward
    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if name):
        raise RuntimeError("compile: true needs a C++ compiler for torch.compile on the CPU (g++, c++ or clang++ on "
                           "PATH, or CXX); install one or set compile: false")
    return torch.compile(forward)


SELECTION_METRICS = ("lung_dice", "infection_dice")


def selection_score(record: dict) -> float:
    """What picks ``best.pt`` among a run's epochs: validation lung Dice plus infection Dice (per case)."""
    return sum(record[metric] for metric in SELECTION_METRICS)


def out_of_patience(state: dict, config: TrainConfig) -> bool:
    """Whether early stopping ends the run: no better validation score for config.patience epochs."""
    return state["epoch"] - state["best_epoch"] >= config.patience


class RunRefused(ValueError):
    """A run that ``train`` will not start as asked: the message says why and what to change."""


def train(config: TrainConfig, log=print, stop_after: int | None = None) -> Path:
    """Train one model as ``config`` says; returns the run folder holding ``best.pt`` and ``history.json``.

    ``best.pt`` is the checkpoint with the best validation score (or the last one without validation or
    with ``keep_epoch: last``);
    with ``keep_from_epoch`` the weights of each epoch from then on are kept too, as ``epochNN.pt``.
    ``stop_after``: stop once epoch ``stop_after`` of the config's schedule is done (its ``last.pt`` is
    the resume point of that epoch, which a later call goes on from, or a second config forks from).
    """
    if stop_after is not None and not 1 <= stop_after <= config.epochs:
        raise RunRefused(f"stop_after must be an epoch of the run (1 to {config.epochs}), not {stop_after}")
    seed_everything(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = pick_device(config.device)
    out_dir = run_dir(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list), encoding="utf-8")

    dataset = load_dataset(config)
    if dataset.images.shape[1:] != (config.input_size, config.input_size):
        raise RunRefused(f"{config.data or 'the PNG export'}: slices are {dataset.images.shape[1:]} pixels but the "
                         f"config says input_size {config.input_size}; prepare the data at that size or fix the config")
    train_set, val_set = split(config, dataset)
    if config.max_train_slices:
        train_set = train_set.subset(np.arange(len(train_set.images)) < config.max_train_slices)
    model = UNet2D(in_channels=config.channels, num_classes=3, base_channels=config.base_channels, depth=config.depth,
                   auxiliary_heads=config.deep_supervision).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision_for(device) == torch.float16)

    state = {"epoch": 0, "step": 0, "best_score": -1.0, "best_epoch": -1, "history": []}
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.exists():
        state = resume(torch.load(last_path, map_location=device, weights_only=False), model, optimizer, scaler)
        log(f"resumed {last_path} at epoch {state['epoch']}")
    elif config.init_from:
        model.load_state_dict(initial_state(config.init_from, config), strict=not config.deep_supervision)
        log(f"starting from the weights of {config.init_from}")
    last_epoch = config.epochs if stop_after is None else stop_after
    if stop_after is not None and state["epoch"] > stop_after:  # before the negatives and the inputs are built
        raise RunRefused(f"{last_path} is at epoch {state['epoch']}, past --stop-after {stop_after}")

    forward = training_forward(model, config, device)
    negatives = negative_sampler(config, log)
    train_inputs = with_context(train_set, config.context_slices)
    val_inputs = None if val_set is None else with_context(val_set, config.context_slices)
    validating = val_set is not None and len(val_set.images) > 0
    # the validation score picks best.pt (and may stop the run early); otherwise each epoch replaces it
    score_picks = validating and config.keep_epoch == "best"
    steps_per_epoch = max(1, (len(train_set.images) + negatives.per_epoch) // config.batch_size)
    order_rng = np.random.default_rng(config.seed)
    for _ in range(state["epoch"]):
        order_rng.permutation(len(train_set.images) + negatives.per_epoch)
    if state.get("stopped_early") and not out_of_patience(state, config):
        # Stopped under a smaller patience than the config's now: train on to config.epochs.
        log(f"{out_dir}: stopped early at epoch {state['epoch']} (best {state['best_epoch']}); "
            f"a patience of {config.patience} lets it go on")
        state["stopped_early"] = False
    if state.get("stopped_early"):
        log(f"{out_dir}: already finished (early stop at epoch {state['epoch']})")
    while state["epoch"] < last_epoch and not state.get("stopped_early"):
        started = time.time()
        hardness = negative_hardness(model, negatives, device) if negatives.per_epoch and negatives.hard_share else None
        model.train()
        labelled = labelled_indices(train_set.cases, config, state["epoch"])
        slices = [(train_inputs[i], train_set.labels[i]) for i in labelled]
        picks = negatives.epoch(state["epoch"], hardness)
        slices += [negatives.slice(*pick) for pick in picks]
        levels = [float("nan")] * len(labelled) + [negatives.level(*pick) for pick in picks]
        order = order_rng.permutation(len(slices))
        losses = []
        batches = epoch_batches([slices[i] for i in order], config, state["epoch"], steps_per_epoch,
                                [i >= len(labelled) for i in order], device,  # the negatives follow the labelled
                                [levels[i] for i in order])
        for images, labels in batches:
            images = network_batch(images.to(device, non_blocking=True))
            images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True).long()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(config, state["step"], steps_per_epoch)
            with autocast(device):
                outputs = forward(images)
            loss = deep_supervision_loss(outputs, labels, config.dice_weight, config.tv_weight,
                                         config.infection_missed_weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            state["step"] += 1
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "loss": float(np.mean(losses)), "seconds": round(time.time() - started, 1),
                  "slices": {"labelled": len(train_set.images), "negative": negatives.per_epoch,
                             **hard_negative_record(negatives, hardness)},
                  "precision": str(precision_for(device)).replace("torch.", "")}
        if validating:
            predicted = predict_labels(model, val_inputs, device)
            record.update(per_case_dice(predicted, val_set.labels, val_set.cases))
        score = selection_score(record) if score_picks else float(state["epoch"])
        improved = score > state["best_score"]
        record["kept"] = improved  # these weights become best.pt (the last epoch marked so is the one it holds)
        state["history"].append(record)
        weights = {"model": model.state_dict(), "config": config.to_dict(), "record": record}
        if improved:
            state["best_score"], state["best_epoch"] = score, state["epoch"]
            save_atomic(weights, best_path)
        if config.keep_from_epoch and state["epoch"] >= config.keep_from_epoch:
            save_atomic(weights, out_dir / f"epoch{state['epoch']:02d}.pt")
        save_atomic(resume_point(model, optimizer, scaler, state), last_path)
        write_text_atomic(out_dir / "history.json", json.dumps(state["history"], indent=2))
        log(json.dumps(record) + (" *" if improved else ""))
        if score_picks and out_of_patience(state, config):
            log(f"early stop: no improvement for {config.patience} epochs")
            state["stopped_early"] = True  # a rerun (crossval resuming) must not train this fold further
            save_atomic(resume_point(model, optimizer, scaler, state), last_path)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML")
    parser.add_argument("--fold", type=int, help="validation fold (overrides the config)")
    parser.add_argument("--epochs", type=int, help="overrides the config")
    parser.add_argument("--device", help="overrides the config (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--workers", type=int, help="overrides the config: processes preparing augmented batches")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="overrides the config: torch.compile the training step (needs a C++ compiler on the CPU)")
    parser.add_argument("--stop-after", type=int, metavar="EPOCH",
                        help="stop after this epoch of the config's schedule; a later call resumes from there")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config).override(fold=args.fold, epochs=args.epochs, device=args.device,
                                                    workers=args.workers, compile=args.compile)
    print(run_dir(config))
    try:
        train(config, log=lambda line: print(line, flush=True), stop_after=args.stop_after)
    except RunRefused as error:
        raise SystemExit(str(error)) from None  # one line and exit 2 from the CLI, not a traceback
    return 0


if __name__ == "__main__":
    sys.exit(main())
