"""Ensemble several model packages into one: a package whose network is the mean of theirs.

nnU-Net's default inference averages its five fold models. Here the members' softmax maps are averaged
and the package outputs the logarithm of that mean (softmax of it gives the mean back), so the engine's
argmax, precision and flip test-time augmentation work on it as on any package; its network time is the
sum of the members'. The members must read their input alike (the same intensity recipe, input and
labels); the manifest names each member (name, version, sha256) and carries no metrics: an ensemble of
fold models has no held-out labelled case left, so it is measured on whole scans (``wholescan``).

    python -m covidseg_training ensemble runs/gpu/packages/covid_unet_v2_dense_fold{0,1,2,3,4}.json \\
        --out runs/ensembles --name covid_unet_v2_dense_folds --version 2.0.0-folds
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from CovidInfectionSegLib.atomic import write_text_atomic
from CovidInfectionSegLib.checksums import sha256_of
from CovidInfectionSegLib.model_package import ModelPackage, load_model_package

from .export import save_scripted

TOLERANCE = 1e-5  # max |scripted - reference| difference of the mean softmax accepted (float32)
SAME_INPUT_KEYS = ("input", "recipe", "labels")  # what every member must share with the first


class MeanSoftmax(torch.nn.Module):
    """The log of the mean of the members' softmax over the class axis (N, C, H, W)."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(0)  # TorchScript wants it typed before the loop; the first member replaces it
        for index, member in enumerate(self.members):
            probabilities = member(x).float().softmax(dim=1)
            total = probabilities if index == 0 else total + probabilities
        return (total / len(self.members)).clamp_min(1e-12).log()


def check_same_input(packages: list[ModelPackage]) -> None:
    """A ValueError naming the first member that reads its input or names its classes unlike the first."""
    first = packages[0]
    for package in packages[1:]:
        differing = [key for key in SAME_INPUT_KEYS if package.manifest.get(key) != first.manifest.get(key)]
        if differing:
            raise ValueError(f"{package.manifest_path}: its {', '.join(differing)} differ from "
                             f"{first.manifest_path}'s; an ensemble's members must read the same input")


def mean_softmax(packages: list[ModelPackage], inputs: torch.Tensor) -> torch.Tensor:
    """The members' softmax maps averaged, computed one member at a time (the reference for the check)."""
    with torch.inference_mode():
        return torch.stack([package.module(inputs).float().softmax(dim=1) for package in packages]).mean(0)


def check_mean_softmax(ensemble: torch.nn.Module, packages: list[ModelPackage], inputs: torch.Tensor) -> None:
    """A RuntimeError unless the softmax of ``ensemble``'s output is the members' mean softmax."""
    with torch.inference_mode():
        produced = ensemble(inputs).softmax(dim=1)
    difference = float((produced - mean_softmax(packages, inputs)).abs().max())
    if difference > TOLERANCE:
        raise RuntimeError(f"the saved ensemble differs from its members' mean softmax by {difference:.3g}")


def ensemble_packages(manifests: list[str | Path], out_dir: str | Path, name: str, version: str) -> Path:
    """Write ``<out_dir>/<name>.pt`` and ``<name>.json``, the ensemble of the packages at ``manifests``;
    returns the manifest path. Nothing is written when a member fails to load or differs in its input."""
    if len(manifests) < 2:
        raise ValueError(f"an ensemble needs at least two packages, got {len(manifests)}")
    packages = [load_model_package(path) for path in manifests]
    check_same_input(packages)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but it is the package format
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(MeanSoftmax([package.module for package in packages]).eval())
    size, channels = packages[0].input_size, packages[0].recipe.channels
    inputs = torch.rand((2, channels, size, size), generator=torch.Generator().manual_seed(0))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = out_dir / f"{name}.pt"
    save_scripted(scripted, weights_path, lambda saved: check_mean_softmax(saved, packages, inputs))
    manifest = ensemble_manifest(packages, weights_path, name, version)
    manifest_path = out_dir / f"{name}.json"
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def ensemble_manifest(packages: list[ModelPackage], weights_path: Path, name: str, version: str) -> dict[str, Any]:
    """The first member's manifest with the ensemble's file, names and architecture, and no metrics."""
    manifest = {key: value for key, value in packages[0].manifest.items()
                if key not in ("metrics", "cross_validation", "infection_logit_offset")}
    members = [{"name": package.name, "version": package.version, "sha256": package.manifest["sha256"],
                "architecture": package.manifest.get("architecture", {})} for package in packages]
    parameters = [member["architecture"].get("parameters") for member in members]
    manifest.update({
        "name": name,
        "version": version,
        "file": weights_path.name,
        "sha256": sha256_of(weights_path),
        "architecture": {"type": "ensemble (mean softmax)", "members": len(members),
                         **({"parameters": sum(parameters)} if all(parameters) else {})},
        "ensemble_of": members,
        "training_data": {"ensemble_members": [package.manifest.get("training_data", {}) for package in packages]},
        "metrics": {"note": "none: measure the ensemble on whole scans (`wholescan`); its members' held-out "
                            "cases are each another member's training cases"},
    })
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training ensemble", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifests", nargs="+", type=Path, help="the members' .json manifests")
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.pt and <name>.json")
    parser.add_argument("--name", required=True, help="package name and file stem")
    parser.add_argument("--version", required=True, help="model version, e.g. 2.0.0-folds")
    args = parser.parse_args(argv)
    try:
        manifest_path = ensemble_packages(args.manifests, args.out, args.name, args.version)
    except (ValueError, RuntimeError) as error:  # ModelError is a RuntimeError
        print(f"ensemble: {error}", file=sys.stderr)
        return 2
    print(f"wrote {manifest_path} (mean softmax of {len(args.manifests)} packages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
