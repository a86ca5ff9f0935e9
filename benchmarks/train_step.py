#!/usr/bin/env python
"""Seconds per training step of a config's network, plain and through torch.compile (``compile: true``).

The step is the one ``covidseg_training.train`` runs: channels-last batch of ``batch_size`` random
slices at ``input_size``, forward (under the precision ``train.precision_for`` picks for the device),
the config's loss, backward, AdamW. Each variant is warmed up (the compiled one compiles there; its
warm-up time is printed as well), then timed over ``--steps`` steps. An epoch's estimate is the mean
step times the config's steps per epoch (labelled training slices of a fold + negatives, over the
batch size), without the hardness pass and the validation.

    python benchmarks/train_step.py training/configs/v2_dense_hardneg.yaml          # 2 threads, CPU
    python benchmarks/train_step.py training/configs/v2_dense_hardneg.yaml --device cuda --plain-only --steps 50

Needs the training extra (``pip install -e ".[training]"``) and, for the compiled step on a CPU, a C++ compiler.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from covidseg_training.config import TrainConfig
from covidseg_training.losses import deep_supervision_loss
from covidseg_training.train import autocast, pick_device, precision_for, training_forward
from covidseg_training.unet import UNet2D

LABELLED_TRAINING_SLICES = 1290  # about 4/5 of the 1614 labelled slices: one fold's training share


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_steps(config: TrainConfig, device: torch.device, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, mean seconds per step after them)."""
    torch.manual_seed(0)
    model = UNet2D(in_channels=config.channels, num_classes=3, base_channels=config.base_channels, depth=config.depth,
                   auxiliary_heads=config.deep_supervision).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    forward = training_forward(model, config, device)
    size = (config.batch_size, config.channels, config.input_size, config.input_size)
    images = torch.rand(size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 3, (config.batch_size, config.input_size, config.input_size), device=device)

    def step() -> None:
        with autocast(device):
            outputs = forward(images)
        loss = deep_supervision_loss(outputs, labels, config.dice_weight, config.tv_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    for _ in range(warmup):
        step()
    warmed = time.perf_counter()
    for _ in range(steps):
        step()
    return warmed - started, (time.perf_counter() - warmed) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment YAML (its network, batch size, loss and negatives)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2, the development CPU's cores)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compiled one compiles there)")
    parser.add_argument("--plain-only", action="store_true", help="skip the compiled variant (it compiles for a minute)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = TrainConfig.load(args.config)
    steps_per_epoch = (LABELLED_TRAINING_SLICES + config.negatives.per_epoch) // config.batch_size
    print(f"{cpu_name()}, torch {torch.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, {str(precision_for(device)).replace('torch.', '')}; "
          f"{config.name}: batch {config.batch_size} of {config.channels} x {config.input_size}^2, "
          f"base_channels {config.base_channels}, depth {config.depth}; {steps_per_epoch} steps an epoch")
    times = {}
    for compiled in (False,) if args.plain_only else (False, True):
        config.compile = compiled
        warmup, per_step = time_steps(config, device, args.steps, args.warmup)
        times[compiled] = per_step
        print(f"{'compiled' if compiled else 'plain':>8}: {per_step * 1000:.1f} ms/step over {args.steps} steps "
              f"(warm-up {args.warmup} steps: {warmup:.0f} s), an epoch's steps about {per_step * steps_per_epoch:.0f} s")
    if len(times) == 2:
        print(f"compiled / plain: {times[True] / times[False]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
