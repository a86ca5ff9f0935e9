"""What a model package's JSON manifest says (ARCHITECTURE.md, "Manifest"), in one place.

The engine only *reads* manifests; the producers are the training export and the test model
factory, so the network's label definitions live here and both import them. The output segments
(names, colours, terminology) are the engine's, from ``CovidInfectionSegLib.segments``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from CovidInfectionSegLib.checksums import sha256_of
from CovidInfectionSegLib.preprocessing import IntensityRecipe
from CovidInfectionSegLib.segments import SEGMENTS

FORMAT_VERSION = 1
LICENCE = "CC BY-NC-SA 4.0"

# What the network predicts (its output channels).
NETWORK_LABELS: list[dict[str, Any]] = [
    {"value": 0, "name": "background"},
    {"value": 1, "name": "lung"},
    {"value": 2, "name": "infection"},
]

MA2020_DATASET = {
    "dataset": "COVID-19 CT Lung and Infection Segmentation Dataset (Ma et al. 2020)",
    "source": "Zenodo record 3757476, doi:10.5281/zenodo.3757476",
    "citation": (
        "Ma J. et al., Towards Data-Efficient Learning: A Benchmark for COVID-19 CT Lung and Infection "
        "Segmentation, Medical Physics 48(3), 2021, doi:10.1002/mp.14676"
    ),
    "licence": LICENCE,
}


def build_manifest(
    weights_path: Path,
    *,
    name: str,
    version: str,
    architecture: dict[str, Any],
    recipe: IntensityRecipe,
    training_data: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    cross_validation: dict[str, Any] | None = None,
    licence: str = LICENCE,
) -> dict[str, Any]:
    """The manifest for the TorchScript file at ``weights_path`` (its sha256 is computed here).
    ``cross_validation`` (from :func:`export.cross_validation_summary`) is left out when not given."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "file": weights_path.name,
        "sha256": sha256_of(weights_path),
        "architecture": architecture,
        "input": {"channels": recipe.channels, "size": recipe.input_size, "scale": 255.0},
        "recipe": recipe.to_manifest(),
        "labels": NETWORK_LABELS,
        "segments": SEGMENTS,
        "training_data": training_data,
        "metrics": metrics or {},
        "licence": licence,
    }
    if cross_validation:
        manifest["cross_validation"] = cross_validation
    return manifest
