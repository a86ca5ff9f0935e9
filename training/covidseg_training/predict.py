"""Run a network over prepared uint8 slices: predicted labels and the infection probability."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from CovidInfectionSegLib.inference import flip_averaged_softmax
from CovidInfectionSegLib.preprocessing import to_network_input

from .data import INFECTION


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


@torch.inference_mode()
def predict(network: torch.nn.Module, images: np.ndarray, batch_size: int = 16) -> Predictions:
    """Float32 inference on the CPU, as the runtime engine runs the exported model."""
    if hasattr(network, "eval"):
        network.eval()
    labels = np.empty(images.shape, dtype=np.uint8)
    probability = np.empty(images.shape, dtype=np.float16)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(to_network_input(images[start : start + batch_size]))
        softmax = network(batch).float().softmax(dim=1)
        labels[start : start + batch_size] = softmax.argmax(dim=1).numpy()
        probability[start : start + batch_size] = softmax[:, INFECTION].numpy()
    return Predictions(labels, probability)
