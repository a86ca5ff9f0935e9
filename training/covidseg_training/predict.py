"""Run a network over prepared uint8 slices: predicted labels and the infection probability."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from CovidInfectionSegLib.inference import flip_averaged_softmax
from CovidInfectionSegLib.preprocessing import to_network_input

from .data import INFECTION, SliceDataset, with_context


@dataclass
class Predictions:
    """``labels`` uint8 (N, H, W) argmax classes; ``infection_probability`` float16 (N, H, W) softmax."""

    labels: np.ndarray
    infection_probability: np.ndarray


class FlipAveraged(torch.nn.Module):
    """``network`` with flip test-time augmentation: the log of the mean softmax of each slice and its
    left-right mirror, so that its softmax and argmax are what the engine's ``flip_tta`` averages."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_averaged_softmax(self.network, x).clamp_min(1e-12).log()


def context_of(network: torch.nn.Module) -> int:
    """How many neighbours on each side ``network`` reads (from its first convolution's input channels)."""
    for parameter in network.parameters():
        if parameter.dim() == 4:
            return (int(parameter.shape[1]) - 1) // 2
    return 0


def predict_dataset(network: torch.nn.Module, dataset: SliceDataset, batch_size: int = 16,
                    images: np.ndarray | None = None, device: torch.device | str = "cpu") -> Predictions:
    """:func:`predict` over a dataset's slices (or ``images``, a copy of them), each with its neighbours
    in the data as channels when ``network`` reads context across slices."""
    return predict(network, with_context(dataset, context_of(network), images), batch_size, device)


@contextmanager
def full_float32():
    """Float32 convolutions and matrix products on a GPU too: TensorFloat-32 off (PyTorch lets cuDNN use it
    by default), so that an evaluation on a GPU computes what the CPU's does, to float rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.inference_mode()
def predict(network: torch.nn.Module, images: np.ndarray, batch_size: int = 16,
            device: torch.device | str = "cpu") -> Predictions:
    """Float32 inference, as the runtime engine runs the exported model on a CPU: uint8 slices (N, H, W),
    or stacks of a slice and its neighbours (N, C, H, W). ``network`` is moved to ``device`` (default the
    CPU; a GPU evaluates the folds of a GPU run in the time the CPU would spend on one)."""
    device = torch.device(device)
    if hasattr(network, "eval"):
        network.eval()
    network = network.to(device)
    labels = np.empty((len(images), *images.shape[-2:]), dtype=np.uint8)
    probability = np.empty(labels.shape, dtype=np.float16)
    with full_float32():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(to_network_input(images[start : start + batch_size])).to(device)
            softmax = network(batch).float().softmax(dim=1).cpu()
            labels[start : start + batch_size] = softmax.argmax(dim=1).numpy()
            probability[start : start + batch_size] = softmax[:, INFECTION].numpy()
    return Predictions(labels, probability)
