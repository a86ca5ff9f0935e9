"""ensemble: several model packages -> one package whose network is the mean of their softmax."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.inference import predict_volume
from CovidInfectionSegLib.sample_data import synthetic_chest
from covidseg_training.__main__ import main as cli
from covidseg_training.checkpoint import build_model
from covidseg_training.config import TrainConfig
from covidseg_training.ensemble import ensemble_packages
from covidseg_training.export import export_checkpoint


def exported_package(folder, seed: int, input_size: int = 64):
    """A real package: a tiny UNet2D with seeded random weights, saved in best.pt's format and exported."""
    config = TrainConfig(name=f"member{seed}", base_channels=4, depth=2, input_size=input_size, n_folds=2, fold=0,
                         data="unused.npz")
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        model.head.weight.mul_(20)  # at initialisation the logits barely differ; this makes the classes vary
    model.eval()
    checkpoint = folder / f"member{seed}.pt.ckpt"
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "record": {"epoch": 1}}, checkpoint)
    return export_checkpoint(checkpoint, folder / "packages", f"member{seed}", f"0.0.{seed}")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("members")
    return [exported_package(folder, seed) for seed in (1, 2, 3)]


def test_the_ensemble_outputs_the_mean_of_its_members_softmax(members, tmp_path):
    assert cli(["ensemble", *map(str, members), "--out", str(tmp_path), "--name", "trio", "--version", "0.1.0"]) == 0
    ensemble = load_model_package(tmp_path / "trio.json")  # checksum, TorchScript, forward-pass shape
    packages = [load_model_package(path) for path in members]
    inputs = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        each = [package.module(inputs).softmax(dim=1) for package in packages]
        mean = torch.stack(each).mean(0)
        produced = ensemble.module(inputs).softmax(dim=1)
    torch.testing.assert_close(produced, mean, atol=1e-5, rtol=0)
    assert all(float((produced - single).abs().max()) > 1e-3 for single in each), "differs from every member"

    manifest = json.loads((tmp_path / "trio.json").read_text(encoding="utf-8"))
    assert [member["version"] for member in manifest["ensemble_of"]] == ["0.0.1", "0.0.2", "0.0.3"]
    assert [member["sha256"] for member in manifest["ensemble_of"]] == [p.manifest["sha256"] for p in packages]
    assert manifest["architecture"]["members"] == 3
    assert manifest["architecture"]["parameters"] == sum(p.manifest["architecture"]["parameters"] for p in packages)
    assert manifest["recipe"] == packages[0].manifest["recipe"] and manifest["segments"] == packages[0].manifest["segments"]
    assert "training_record" not in json.dumps(manifest["metrics"]), "no member's metrics passed off as the ensemble's"


def test_a_package_ensembled_with_itself_predicts_a_volume_as_the_package_does(members, tmp_path):
    """Through the engine's inference, flip test-time augmentation included (it takes the softmax of the
    ensemble's output, which must therefore be a log-probability, not a probability)."""
    ensemble_packages([members[2], members[2]], tmp_path, "twice", "0.0.3-twice")
    volume = sitk.GetArrayFromImage(synthetic_chest(size=(96, 96, 10), spacing=(1.5, 1.5, 5.0)))
    alone, twice = load_model_package(members[2]), load_model_package(tmp_path / "twice.json")
    for flip_tta in (False, True):
        expected = predict_volume(volume, alone, device="cpu", precision="fp32", flip_tta=flip_tta)
        produced = predict_volume(volume, twice, device="cpu", precision="fp32", flip_tta=flip_tta)
        assert len(np.unique(expected)) == 3, "the random member calls all three classes, so the comparison means something"
        assert np.mean(produced != expected) < 1e-4, f"flip_tta={flip_tta}"


def test_members_that_read_their_input_differently_are_refused_and_nothing_is_written(members, tmp_path):
    other = exported_package(tmp_path, seed=4, input_size=32)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="member4.json: its input, recipe differ"):
        ensemble_packages([members[0], other], out, "mixed", "0.0.1")
    assert not out.exists() or not any(out.iterdir())


def test_the_command_says_what_is_wrong(members, tmp_path, capsys):
    assert cli(["ensemble", str(members[0]), "--out", str(tmp_path), "--name", "one", "--version", "0"]) == 2
    assert "at least two packages, got 1" in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert cli(["ensemble", str(members[0]), str(missing), "--out", str(tmp_path), "--name", "x", "--version", "0"]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "one.pt").exists()
