"""Model package loading: real TorchScript files, and every way a package can be broken."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from model_factory import write_model_package
from torch import nn

from CovidInfectionSegLib import model_package
from CovidInfectionSegLib.model_package import (
    MODEL_ENV_VAR,
    ModelError,
    ModelPackage,
    SegmentInfo,
    default_model_path,
    load_model_package,
)
from CovidInfectionSegLib.preprocessing import IntensityRecipe
from CovidInfectionSegLib.segments import GENERAL_ANATOMY_CONTEXT


@pytest.fixture
def package_dir(tmp_path: Path, tiny_model_manifest: Path) -> Path:
    """A private copy of the tiny package, free to damage."""
    folder = tmp_path / "package"
    shutil.copytree(tiny_model_manifest.parent, folder)
    return folder


def edit_manifest(manifest_path: Path, **changes) -> None:
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    manifest_path.write_text(json.dumps(manifest))


def test_load_from_manifest(tiny_model_manifest: Path) -> None:
    package = load_model_package(tiny_model_manifest)
    assert isinstance(package, ModelPackage)
    assert package.name == "tiny" and package.version == "0.0.1"
    assert package.manifest_path == tiny_model_manifest
    assert package.recipe == IntensityRecipe()
    assert package.labels == {0: "background", 1: "lung", 2: "infection"}
    assert package.label_value("infection") == 2
    assert [segment.name for segment in package.segments] == ["Right lung", "Left lung", "Infection"]
    assert package.segments[0] == SegmentInfo(
        1,
        "Right lung",
        (128, 174, 128),
        {"context": GENERAL_ANATOMY_CONTEXT, "category": ["SCT", "123037004", "Anatomical Structure"],
         "type": ["SCT", "39607008", "Lung"], "type_modifier": ["SCT", "24028007", "Right"]},
    )
    output = package.module(torch.zeros(2, 1, 256, 256))
    assert tuple(output.shape) == (2, 3, 256, 256)


def test_load_from_pt_finds_the_manifest_beside_it(tiny_model_manifest: Path) -> None:
    package = load_model_package(tiny_model_manifest.with_suffix(".pt"))
    assert package.manifest_path == tiny_model_manifest


def test_pt_whose_manifest_has_another_name_is_found(package_dir: Path) -> None:
    (package_dir / "tiny.json").rename(package_dir / "manifest.json")
    assert load_model_package(package_dir / "tiny.pt").manifest_path == package_dir / "manifest.json"


def test_pt_without_manifest(package_dir: Path) -> None:
    (package_dir / "tiny.json").unlink()
    with pytest.raises(ModelError, match=r"tiny\.pt: no manifest beside it"):
        load_model_package(package_dir / "tiny.pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"absent\.json: model file not found"):
        load_model_package(tmp_path / "absent.json")


def test_wrong_kind_of_file(package_dir: Path) -> None:
    other = package_dir / "weights.onnx"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match=r"weights\.onnx: not a model package file"):
        load_model_package(other)


def test_default_path_is_the_bundled_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    path = default_model_path()
    package_folder = Path(model_package.__file__).resolve().parent
    assert path == package_folder.parent / "Resources" / "Models" / "covid_unet_v2.json"


def test_missing_bundled_model_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODEL_ENV_VAR, raising=False)
    if default_model_path().exists():
        pytest.skip("the bundled model is present in this checkout")
    with pytest.raises(ModelError, match=rf"bundled model is not there.*{MODEL_ENV_VAR}="):
        load_model_package()


def test_environment_variable_overrides_the_default(monkeypatch: pytest.MonkeyPatch, tiny_model_manifest: Path) -> None:
    monkeypatch.setenv(MODEL_ENV_VAR, str(tiny_model_manifest))
    assert default_model_path() == tiny_model_manifest
    assert load_model_package().name == "tiny"
    monkeypatch.setenv(MODEL_ENV_VAR, str(tiny_model_manifest.parent / "gone.json"))
    with pytest.raises(ModelError, match=rf"gone\.json: model file not found \(named by .*{MODEL_ENV_VAR}\)"):
        load_model_package()


def test_checksum_mismatch(package_dir: Path) -> None:
    manifest_path = package_dir / "tiny.json"
    expected = json.loads(manifest_path.read_text(encoding="utf-8"))["sha256"]
    weights = package_dir / "tiny.pt"
    weights.write_bytes(weights.read_bytes() + b"\x00")
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(ModelError, match=rf"tiny\.pt: checksum mismatch: expected {expected} .*got {actual}"):
        load_model_package(manifest_path)


def test_corrupt_pt_with_matching_checksum(package_dir: Path) -> None:
    weights = package_dir / "tiny.pt"
    weights.write_bytes(b"PK\x03\x04 not really a zip archive" * 10)
    edit_manifest(package_dir / "tiny.json", sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    with pytest.raises(ModelError, match=r"tiny\.pt: not a loadable TorchScript model"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_naming_a_missing_pt(package_dir: Path) -> None:
    (package_dir / "tiny.pt").unlink()
    with pytest.raises(ModelError, match=r"tiny\.json: the model file it names is missing: .*tiny\.pt"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_not_json(package_dir: Path) -> None:
    (package_dir / "tiny.json").write_text('{"name": "tiny", ')
    with pytest.raises(ModelError, match=r"tiny\.json: manifest is not valid JSON"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_missing_keys(package_dir: Path) -> None:
    edit_manifest(package_dir / "tiny.json", sha256=None, labels=None)
    with pytest.raises(ModelError, match=r"tiny\.json: manifest lacks required keys: sha256, labels"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_unsupported_format_version(package_dir: Path) -> None:
    edit_manifest(package_dir / "tiny.json", format_version=7)
    with pytest.raises(ModelError, match=r"unsupported format_version 7"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_with_bad_labels(package_dir: Path) -> None:
    edit_manifest(package_dir / "tiny.json", labels=[{"value": 0, "name": "background"}, {"value": 5, "name": "lung"}])
    with pytest.raises(ModelError, match=r"'labels' values must be 0..n-1"):
        load_model_package(package_dir / "tiny.json")


def test_manifest_with_bad_segments(package_dir: Path) -> None:
    edit_manifest(package_dir / "tiny.json", segments=[{"value": 1, "name": "Right lung"}])
    with pytest.raises(ModelError, match=r"invalid 'segments'"):
        load_model_package(package_dir / "tiny.json")


class TwoClassNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


def test_network_output_not_matching_the_labels(tmp_path: Path) -> None:
    manifest_path = write_model_package(tmp_path, TwoClassNet(), name="twoclass")
    with pytest.raises(
        ModelError, match=r"twoclass\.pt: a one-slice forward pass gave \(1, 2, 256, 256\), expected \(1, 3, 256, 256\)"
    ):
        load_model_package(manifest_path)


class WrongInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_network_that_fails_on_one_slice(tmp_path: Path) -> None:
    manifest_path = write_model_package(tmp_path, WrongInputNet(), name="rgbnet")
    with pytest.raises(ModelError, match=r"rgbnet\.pt: a one-slice forward pass failed"):
        load_model_package(manifest_path)
