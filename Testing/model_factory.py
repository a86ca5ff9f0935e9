"""Build small but real TorchScript model packages (.pt + manifest) for tests.

``ThresholdNet`` is a genuine TorchScript network with fixed weights: it calls dark pixels "lung"
and very bright ones "infection". That is enough to exercise every mechanism (loading, checksum,
batching, geometry, post-processing, outputs) without the trained model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from CovidInfectionSegLib.preprocessing import IntensityRecipe

SEGMENTS = [
    {
        "value": 1, "name": "Right lung", "color": [128, 174, 128], "source_label": 1,
        "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "3341006", "Right lung"]},
    },
    {
        "value": 2, "name": "Left lung", "color": [241, 214, 145], "source_label": 1,
        "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "44029006", "Left lung"]},
    },
    {
        "value": 3, "name": "Infection", "color": [216, 101, 79], "source_label": 2,
        "terminology": {
            "category": ["SCT", "49755003", "Morphologically Altered Structure"],
            "type": ["SCT", "40733004", "Infection"],
            "anatomic_region": ["SCT", "39607008", "Lung"],
        },
    },
]


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


def write_model_package(
    folder: Path, module: nn.Module | None = None, name: str = "tiny", recipe: IntensityRecipe | None = None
) -> Path:
    """Script ``module`` (default ThresholdNet), save it with a manifest; returns the manifest path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    module = (module or ThresholdNet()).eval()
    pt_path = folder / f"{name}.pt"
    torch.jit.save(torch.jit.script(module), str(pt_path))
    recipe = recipe or IntensityRecipe()
    manifest = {
        "format_version": 1,
        "name": name,
        "version": "0.0.1",
        "file": pt_path.name,
        "sha256": hashlib.sha256(pt_path.read_bytes()).hexdigest(),
        "architecture": {"type": type(module).__name__},
        "input": {"channels": 1, "size": recipe.input_size, "scale": 255.0},
        "recipe": recipe.to_manifest(),
        "labels": [
            {"value": 0, "name": "background"},
            {"value": 1, "name": "lung"},
            {"value": 2, "name": "infection"},
        ],
        "segments": SEGMENTS,
        "training_data": {"description": "none: a fixed-weight test network"},
        "metrics": {},
        "licence": "Apache-2.0",
    }
    manifest_path = folder / f"{name}.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return manifest_path
