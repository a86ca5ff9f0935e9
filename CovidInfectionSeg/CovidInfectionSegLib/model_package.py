"""A model package: a TorchScript network (``.pt``) and its JSON manifest, checked before use.

The manifest (see ARCHITECTURE.md) names the ``.pt`` file, its sha256, the intensity recipe, the
network's output labels and the post-processed output segments. Loading checks every one of them
and fails with a :class:`ModelError` that names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checksums import sha256_of
from .preprocessing import IntensityRecipe
from .segments import SegmentInfo  # noqa: F401  (part of this module's interface)

MODEL_ENV_VAR = "COVIDSEG_MODEL"
DEFAULT_MODEL_FILE = "covid_unet_v2.json"
REQUIRED_KEYS = ("format_version", "name", "version", "file", "sha256", "input", "recipe", "labels", "segments")
SUPPORTED_FORMAT_VERSIONS = (1,)


class ModelError(RuntimeError):
    """A model package is missing, corrupt or inconsistent with its manifest."""


@dataclass
class ModelPackage:
    """A loaded, verified model: the TorchScript module plus what its manifest says about it."""

    manifest: dict[str, Any]
    module: torch.jit.ScriptModule
    manifest_path: Path
    recipe: IntensityRecipe
    labels: dict[int, str]
    segments: list[SegmentInfo]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def weights_path(self) -> Path:
        return self.manifest_path.parent / self.manifest["file"]

    @property
    def input_size(self) -> int:
        return self.recipe.input_size

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    def label_value(self, name: str) -> int:
        """The network output class called ``name`` (e.g. "lung", "infection")."""
        for value, label_name in self.labels.items():
            if label_name.lower() == name.lower():
                return value
        raise ModelError(f"{self.manifest_path}: manifest 'labels' has no label named {name!r} ({self.labels})")

    def describe(self) -> str:
        """One line for logs and `covidseg info`."""
        return f"{self.name} {self.version} ({self.manifest_path})"


def default_model_path() -> Path:
    """The model to use when none is given: ``$COVIDSEG_MODEL`` if set, else the bundled manifest.

    The bundled model lives in the Slicer module's ``Resources/Models`` folder, next to this package.
    """
    override = os.environ.get(MODEL_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "Resources" / "Models" / DEFAULT_MODEL_FILE


def load_model_package(path: str | Path | None = None, *, smoke_test: bool = True) -> ModelPackage:
    """Load and verify a model package from its ``.json`` manifest or its ``.pt`` (manifest beside it).

    With ``path=None`` the :func:`default_model_path` is used. Checks: the files exist, the manifest is
    valid JSON with the required keys, the ``.pt`` sha256 matches the manifest, TorchScript loads it,
    and (``smoke_test``) a one-slice forward pass returns ``(1, n_labels, size, size)``.
    Raises :class:`ModelError` naming the file and the problem.
    """
    manifest_path = _locate_manifest(path)
    manifest = _read_manifest(manifest_path)
    weights_path = manifest_path.parent / str(manifest["file"])
    if not weights_path.is_file():
        raise ModelError(f"{manifest_path}: the model file it names is missing: {weights_path}")
    actual = sha256_of(weights_path)
    expected = str(manifest["sha256"]).lower()
    if actual != expected:
        raise ModelError(
            f"{weights_path}: checksum mismatch: expected {expected} (from {manifest_path.name}), got {actual}; "
            "the file is corrupt or does not belong to this manifest"
        )
    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in favour of torch.export, but it is the package format Slicer can run
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(weights_path), map_location="cpu")
    except Exception as error:  # TorchScript raises RuntimeError or ValueError depending on the damage
        raise ModelError(f"{weights_path}: not a loadable TorchScript model: {_first_line(error)}") from error
    module.eval()
    recipe = _parse_recipe(manifest, manifest_path)
    labels = _parse_labels(manifest, manifest_path)
    segments = _parse_segments(manifest, manifest_path)
    package = ModelPackage(manifest, module, manifest_path, recipe, labels, segments)
    if smoke_test:
        _check_forward(package)
    return package


def read_model_manifest(path: str | Path | None = None) -> dict[str, Any]:
    """The manifest :func:`load_model_package` would use for ``path``, read and checked for its required
    keys, without loading the network (for a process whose child process loads the model, such as the
    Slicer batch script). Raises :class:`ModelError` naming the file and the problem."""
    return _read_manifest(_locate_manifest(path))


def _locate_manifest(path: str | Path | None) -> Path:
    using_default = path is None
    return _manifest_path_for(Path(path).expanduser() if path is not None else default_model_path(), using_default)


def _manifest_path_for(path: Path, using_default: bool) -> Path:
    if not path.exists():
        if using_default and os.environ.get(MODEL_ENV_VAR):
            raise ModelError(f"{path}: model file not found (named by the environment variable {MODEL_ENV_VAR})")
        if using_default:
            raise ModelError(
                f"the bundled model is not there: {path}. Build it with the training pipeline "
                "(training/README.md: prepare, train, export) or download a released model package, then "
                f"put covid_unet_v2.pt + covid_unet_v2.json in that folder, or point to a package with the "
                f"environment variable {MODEL_ENV_VAR}=/path/to/model.json (CLI: --model)"
            )
        raise ModelError(f"{path}: model file not found")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder; give the model's .json manifest or its .pt file")
    if path.suffix.lower() == ".json":
        return path
    if path.suffix.lower() == ".pt":
        beside = path.with_suffix(".json")
        if beside.is_file():
            return beside
        for candidate in sorted(path.parent.glob("*.json")):
            try:
                if json.loads(candidate.read_text(encoding="utf-8")).get("file") == path.name:
                    return candidate
            except (ValueError, OSError, AttributeError):
                continue
        raise ModelError(f'{path}: no manifest beside it (expected {beside.name} naming "file": "{path.name}")')
    raise ModelError(f"{path}: not a model package file (expected a .json manifest or a .pt TorchScript file)")


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelError(f"{manifest_path}: manifest is not valid JSON: {error}") from error
    except OSError as error:
        raise ModelError(f"{manifest_path}: cannot read manifest: {error}") from error
    if not isinstance(manifest, dict):
        raise ModelError(f"{manifest_path}: manifest must be a JSON object, got {type(manifest).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ModelError(f"{manifest_path}: manifest lacks required keys: {', '.join(missing)}")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise ModelError(
            f"{manifest_path}: unsupported format_version {manifest['format_version']!r} "
            f"(this version reads {SUPPORTED_FORMAT_VERSIONS})"
        )
    return manifest


def _parse_recipe(manifest: dict[str, Any], manifest_path: Path) -> IntensityRecipe:
    try:
        recipe = IntensityRecipe.from_manifest(manifest["recipe"])
    except (TypeError, ValueError, IndexError, AttributeError) as error:
        raise ModelError(f"{manifest_path}: invalid 'recipe' block: {error}") from error
    input_size = manifest["input"].get("size") if isinstance(manifest["input"], dict) else None
    if input_size is not None and int(input_size) != recipe.input_size:
        raise ModelError(
            f"{manifest_path}: 'input.size' ({input_size}) and 'recipe.input_size' ({recipe.input_size}) disagree"
        )
    channels = manifest["input"].get("channels") if isinstance(manifest["input"], dict) else None
    if channels is not None and int(channels) != recipe.channels:
        raise ModelError(
            f"{manifest_path}: 'input.channels' ({channels}) and the recipe's context across slices "
            f"(context_slices {recipe.context_slices}: {recipe.channels} channels) disagree"
        )
    return recipe


def _parse_labels(manifest: dict[str, Any], manifest_path: Path) -> dict[int, str]:
    try:
        labels = {int(item["value"]): str(item["name"]) for item in manifest["labels"]}
    except (TypeError, KeyError, ValueError) as error:
        raise ModelError(f"{manifest_path}: invalid 'labels' (need a list of {{value, name}}): {error}") from error
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise ModelError(f"{manifest_path}: 'labels' values must be 0..n-1 with n >= 2, got {sorted(labels)}")
    return labels


def _parse_segments(manifest: dict[str, Any], manifest_path: Path) -> list[SegmentInfo]:
    try:
        segments = [
            SegmentInfo(
                value=int(item["value"]),
                name=str(item["name"]),
                color=tuple(int(channel) for channel in item["color"]),  # type: ignore[arg-type]
                terminology=dict(item.get("terminology", {})),
            )
            for item in manifest["segments"]
        ]
    except (TypeError, KeyError, ValueError) as error:
        raise ModelError(
            f"{manifest_path}: invalid 'segments' (need a list of {{value, name, color, terminology}}): {error}"
        ) from error
    values = [segment.value for segment in segments]
    if len(set(values)) != len(values) or any(value <= 0 or value > 255 for value in values):
        raise ModelError(f"{manifest_path}: 'segments' values must be distinct and in 1..255, got {values}")
    return segments


def _check_forward(package: ModelPackage) -> None:
    size = package.input_size
    try:
        with torch.inference_mode():
            output = package.module(torch.zeros((1, package.recipe.channels, size, size), dtype=torch.float32))
    except Exception as error:
        raise ModelError(f"{package.weights_path}: a one-slice forward pass failed with {package.recipe.channels} "
                         f"input channel(s) (recipe.context_slices {package.recipe.context_slices}): "
                         f"{_first_line(error)}") from error
    expected = (1, package.n_labels, size, size)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(
            f"{package.weights_path}: a one-slice forward pass gave {shape}, expected {expected} "
            f"(n_labels from {package.manifest_path.name})"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
