"""Read what ``train`` writes: ``best.pt`` = {"model": state_dict, "config": TrainConfig dict, "record": metrics}.

Also tells a training checkpoint from a TorchScript model package, so ``evaluate`` takes either.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from CovidInfectionSegLib.model_package import load_model_package

from .config import TrainConfig
from .unet import UNet2D
from .widen import widen_unet_state


@dataclass
class Checkpoint:
    """An eager model rebuilt from a training checkpoint, in eval mode on the CPU."""

    path: Path
    model: UNet2D
    config: TrainConfig
    record: dict[str, Any]

    @property
    def epoch(self) -> int | None:
        """The epoch whose weights these are, from the record (None where it does not say)."""
        return record_epoch(self.record)


def build_model(config: TrainConfig) -> UNet2D:
    """The network a config describes (3 classes: background, lung, infection), as it is exported and
    evaluated: without the deep-supervision heads that only training uses."""
    return UNet2D(in_channels=config.channels, num_classes=3, base_channels=config.base_channels, depth=config.depth)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load ``best.pt``/``last.pt``-style checkpoints written by :func:`covidseg_training.train.train`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(content, dict) or "model" not in content or "config" not in content:
        keys = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f"{path}: not a training checkpoint with 'model' and 'config' (found {keys}); "
            "last.pt holds no config: use best.pt, or an epochNN.pt that keep_from_epoch kept (for the last epoch, "
            "keep_from_epoch: EPOCHS)"
        )
    config = TrainConfig.from_dict(content["config"])
    model = model_with_weights(content["model"], config, str(path))
    model.eval()
    return Checkpoint(path=path, model=model, config=config, record=dict(content.get("record", {})))


def is_torchscript_file(path: Path) -> bool:
    """True for a TorchScript archive (it holds ``code/`` and ``constants.pkl``), False for a plain checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


class LoadedNetwork(NamedTuple):
    """What :func:`load_network` gives: the network, its training config (None for a package), a one-line
    description, and the epoch whose weights it holds (None where the file does not say)."""

    module: torch.nn.Module
    config: TrainConfig | None
    description: str
    epoch: int | None


def load_network(path: str | Path) -> LoadedNetwork:
    """A callable network from a training checkpoint, a TorchScript ``.pt`` or a manifest ``.json``; a
    package's epoch is the one its manifest's ``metrics.training_record`` names (what export took)."""
    path = Path(path)
    if path.suffix.lower() == ".json" or (path.is_file() and is_torchscript_file(path)):
        package = load_model_package(path)
        record = (package.manifest.get("metrics") or {}).get("training_record") or {}
        return LoadedNetwork(package.module, None, f"model package {package.describe()}", record_epoch(record))
    checkpoint = load_checkpoint(path)
    return LoadedNetwork(checkpoint.model, checkpoint.config, f"checkpoint {path} ({checkpoint.record})",
                         checkpoint.epoch)


def record_epoch(record: Any) -> int | None:
    """A training record's ``epoch`` (a checkpoint's, or a package manifest's ``training_record``), or None."""
    epoch = record.get("epoch") if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def initial_state(path: str | Path, config: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights a run starts from (the config's ``init_from``): a training checkpoint or an exported
    TorchScript ``.pt`` of the architecture that ``config`` builds, or of a narrower one of the same depth
    when ``config.init_widen`` (widened without changing its function, see :mod:`.widen`). A single-slice
    network starts a context model (``config.context_slices``) as :func:`with_context_channels` says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} not found")
    if is_torchscript_file(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = load_checkpoint(path).model.state_dict()
    if config.context_slices and state["encoders.0.0.weight"].shape[1] == 1:
        state = with_context_channels(state, config.channels)
    if config.init_widen:
        try:
            state = widen_unet_state(state, config.base_channels, config.depth, seed=config.seed)
        except (KeyError, ValueError) as error:
            raise ValueError(f"init_from: {path}: cannot widen to UNet2D(base_channels={config.base_channels}, "
                             f"depth={config.depth}): {error}") from error
    return model_with_weights(state, config, f"init_from: {path}").state_dict()


def with_context_channels(state: dict[str, torch.Tensor], channels: int) -> dict[str, torch.Tensor]:
    """Weights of a single-slice network made to read ``channels`` input channels, the slice in the
    middle, computing what it did: the neighbours' weights start at zero, and training grows them."""
    weight = state["encoders.0.0.weight"]
    grown = torch.zeros((weight.shape[0], channels, *weight.shape[2:]), dtype=weight.dtype)
    grown[:, channels // 2] = weight[:, 0]
    return {**state, "encoders.0.0.weight": grown}


def model_with_weights(state: dict[str, torch.Tensor], config: TrainConfig, source: str) -> UNet2D:
    """The network ``config`` builds, holding ``state``; a ValueError naming ``source`` when they do not fit."""
    model = build_model(config)
    state = {name: value for name, value in state.items() if not name.startswith("auxiliary.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{source}: weights do not fit a UNet2D(in_channels={config.channels}, "
                         f"base_channels={config.base_channels}, depth={config.depth}): "
                         f"{str(error).splitlines()[0]}") from error
    return model


def save_half_precision_copy(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Write ``path`` (a ``best.pt``-style checkpoint) to ``out`` with its floating-point weights in float16:
    half the bytes, for carrying a checkpoint where files are limited in size (the GPU machine returns
    files of at most 16 MiB; a 24-channel network's best.pt is 17.5 MB). ``load_checkpoint`` reads the copy
    as it reads the original (the weights go back to float32 as they load), so evaluate, export and
    wholescan take it unchanged; the rounding (a relative 2^-11 per weight) is not undone, and the copy's
    record says it was made. Returns that record."""
    path = Path(path)
    content = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(content, dict) or "model" not in content or "config" not in content:
        raise ValueError(f"{path}: not a training checkpoint with 'model' and 'config'")
    state = {name: value.half() if value.is_floating_point() else value for name, value in content["model"].items()}
    record = {**content.get("record", {}), "weights": f"float16 copy of {path.name}"}
    torch.save({"model": state, "config": content["config"], "record": record}, out)
    return record
