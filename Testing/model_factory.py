"""Build small but real TorchScript model packages (.pt + manifest) for tests.

``ThresholdNet`` is a genuine TorchScript network with fixed weights: it calls dark pixels "lung"
and very bright ones "infection". That is enough to exercise every mechanism (loading, checksum,
batching, geometry, post-processing, outputs) without the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from CovidInfectionSegLib.preprocessing import IntensityRecipe
from covidseg_training.manifest import build_manifest


class ThresholdNet(nn.Module):
    """Logits for (background, lung, infection) from intensity alone, through a real conv layer."""

    def __init__(self, lung_below: float = 0.3, infection_above: float = 0.97):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=1)
        with torch.no_grad():
            # background logit 0; lung wins below lung_below, infection above infection_above
            self.conv.weight[:] = torch.tensor([[[[0.0]]], [[[-20.0]]], [[[40.0]]]])
            self.conv.bias[:] = torch.tensor([0.0, 20.0 * lung_below, -40.0 * infection_above])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class HalfBlindNet(nn.Module):
    """ThresholdNet that doubts the left half of every image (lung and infection logits lowered by
    ``penalty`` there): its output is not mirror-symmetric, so flip test-time augmentation changes it."""

    def __init__(self, penalty: float = 4.0):
        super().__init__()
        self.threshold = ThresholdNet(lung_below=0.3, infection_above=0.75)
        self.penalty = penalty

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.threshold(x)
        bias = torch.zeros_like(logits)
        bias[:, 1:, :, : x.shape[3] // 2] = -self.penalty
        return logits + bias


def write_model_package(
    folder: Path, module: nn.Module | None = None, name: str = "tiny", recipe: IntensityRecipe | None = None
) -> Path:
    """Script ``module`` (default ThresholdNet), save it with a manifest; returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = (module or ThresholdNet()).eval()
    pt_path = folder / f"{name}.pt"
    torch.jit.save(torch.jit.script(module), str(pt_path))
    manifest = build_manifest(
        pt_path,
        name=name,
        version="0.0.1",
        architecture={"type": type(module).__name__},
        recipe=recipe or IntensityRecipe(),
        training_data={"description": "none: a fixed-weight test network"},
        licence="Apache-2.0",
    )
    manifest_path = folder / f"{name}.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest_path
