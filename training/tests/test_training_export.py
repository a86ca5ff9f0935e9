"""export: a training checkpoint -> TorchScript + manifest that the runtime engine accepts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from CovidInfectionSegLib.model_package import load_model_package
from covidseg_training.checkpoint import build_model, load_checkpoint, load_network, save_half_precision_copy
from covidseg_training.config import TrainConfig
from covidseg_training.export import describe_training_data, export_checkpoint, main as export_main, verify_same_output
from covidseg_training.manifest import SEGMENTS


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    """A best.pt in train's format with random (but fixed) weights and non-trivial batch-norm statistics."""
    config = TrainConfig(name="tiny", base_channels=4, depth=2, input_size=64, n_folds=2, fold=0, data="unused.npz")
    torch.manual_seed(0)
    model = build_model(config)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, 64, 64))  # moves the running statistics away from 0/1
    path = tmp_path_factory.mktemp("run") / "best.pt"
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "record": {"epoch": 3}}, path)
    return path


def test_export_writes_a_package_the_engine_loads(checkpoint_path, tmp_path):
    metrics = tmp_path / "summary.json"
    metrics.write_text(json.dumps({"per_case": {"lung": {"dice": {"mean": 0.5}}}}))
    assert export_main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "models"), "--name", "tiny_unet",
                        "--version", "0.1.0", "--metrics", str(metrics)]) == 0
    manifest_path = tmp_path / "models" / "tiny_unet.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["format_version"] == 1 and manifest["file"] == "tiny_unet.pt" and manifest["version"] == "0.1.0"
    assert manifest["architecture"]["type"] == "UNet2D" and manifest["architecture"]["depth"] == 2
    checkpoint = load_checkpoint(checkpoint_path)
    assert manifest["architecture"]["parameters"] == sum(p.numel() for p in checkpoint.model.parameters())
    assert manifest["input"] == {"channels": 1, "size": 64, "scale": 255.0}
    assert manifest["recipe"]["hu_window"] == [-1024.0, 3071.0] and manifest["recipe"]["input_size"] == 64
    assert manifest["segments"] == SEGMENTS
    assert [label["name"] for label in manifest["labels"]] == ["background", "lung", "infection"]
    assert manifest["licence"] == "CC BY-NC-SA 4.0"
    assert manifest["metrics"]["per_case"]["lung"]["dice"]["mean"] == 0.5
    assert manifest["metrics"]["training_record"] == {"epoch": 3}
    assert "3757476" in manifest["training_data"]["source"] and manifest["training_data"]["validation_fold"] == 0
    assert "unknown" in manifest["training_data"]["cases"]  # its data file does not exist: said, not invented

    package = load_model_package(manifest_path)  # checksum, TorchScript, forward-pass shape
    assert package.input_size == 64 and [s.name for s in package.segments] == ["Right lung", "Left lung", "Infection"]
    inputs = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(package.module(inputs), checkpoint.model(inputs), atol=1e-5, rtol=0)
    assert not list(tmp_path.glob("models/.*part*")), "no temporary files left behind"


def test_all_data_checkpoint_carries_the_held_out_estimate_of_its_recipe(checkpoint_path, tmp_path):
    """A model trained on every case has nothing left to be scored on: export takes the evaluation of the
    same recipe with a fold held out (another file), and says so; a fold checkpoint still refuses it."""
    fold_summary = {"evaluated_sha256": "0" * 64, "evaluated_file": "runs/v1/fold0/best.pt", "fold": 0,
                    "per_case": {"lung": {"dice": {"mean": 0.98}}}}
    with pytest.raises(ValueError, match="the metrics were computed on runs/v1/fold0/best.pt"):
        export_checkpoint(checkpoint_path, tmp_path / "fold", "pkg", "1.0.0", metrics=fold_summary)
    stored = torch.load(checkpoint_path, weights_only=False)
    all_data = tmp_path / "all" / "best.pt"
    all_data.parent.mkdir()
    torch.save({**stored, "config": {**stored["config"], "fold": None}}, all_data)
    manifest_path = export_checkpoint(all_data, tmp_path / "models", "pkg", "1.0.0", metrics=fold_summary,
                                      training_data={"note": "test"})
    metrics = json.loads(manifest_path.read_text(encoding="utf-8"))["metrics"]
    assert metrics["per_case"]["lung"]["dice"]["mean"] == 0.98 and metrics["fold"] == 0
    assert "trained on every case" in metrics["estimate_of_recipe"]


def test_manifest_says_what_the_negative_scans_taught_and_where_they_come_from(checkpoint_path):
    """An all-data model trained with negatives names every negative scan, its licence and what its lung taught."""
    stored = torch.load(checkpoint_path, weights_only=False)
    config = TrainConfig.from_dict({**stored["config"], "fold": None,
                                    "negatives": {"per_epoch": 400, "lung_label": "no_infection_where_dense"}})
    negatives = describe_training_data(config, {"epoch": 30})["negative_scans"]
    assert negatives["scans"] == ["LIDC-IDRI-0001", "LIDC-IDRI-0003", "abdominal-ct"]
    assert negatives["slices_per_epoch"] == 400 and negatives["lung_label"] == "no_infection_where_dense"
    assert "denser than -500 HU" in negatives["lung_label_means"] and "nodules" in negatives["lung_label_means"]
    assert "CC BY 3.0" in negatives["sources"]["LIDC-IDRI-0003"] and "Apache-2.0" in negatives["sources"]["abdominal-ct"]
    fold_1 = describe_training_data(TrainConfig.from_dict({**config.to_dict(), "fold": 1}), {"epoch": 30})
    assert fold_1["negative_scans"]["scans"] == ["LIDC-IDRI-0001", "abdominal-ct"]
    assert set(fold_1["negative_scans"]["sources"]) == {"LIDC-IDRI-0001", "abdominal-ct"}


def test_load_network_tells_checkpoints_from_packages(checkpoint_path, tmp_path):
    manifest_path = export_checkpoint(checkpoint_path, tmp_path, "pkg", "1.0.0", training_data={"note": "test"})
    trained = load_checkpoint(checkpoint_path).record["epoch"]
    assert isinstance(trained, int)
    for path in (manifest_path, tmp_path / "pkg.pt"):
        network, config, description, epoch = load_network(path)
        assert config is None and "model package" in description
        assert epoch == trained  # the manifest's training record names the epoch export took
    network, config, description, epoch = load_network(checkpoint_path)
    assert config is not None and config.base_channels == 4 and epoch == trained


def test_verification_catches_a_different_network(checkpoint_path):
    model = load_checkpoint(checkpoint_path).model
    other = build_model(TrainConfig(base_channels=4, depth=2)).eval()
    with pytest.raises(RuntimeError, match="differs from eager"):
        verify_same_output(model, other, 64)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    last_style = tmp_path / "last.pt"
    torch.save({"model": {}, "optimizer": {}, "state": {}}, last_style)
    with pytest.raises(ValueError, match="last.pt: not a training checkpoint.*use best.pt, or an epochNN.pt"):
        load_checkpoint(last_style)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    wrong = tmp_path / "wrong.pt"
    state = build_model(TrainConfig(base_channels=4, depth=2)).state_dict()
    torch.save({"model": state, "config": TrainConfig(base_channels=8, depth=2).to_dict()}, wrong)
    with pytest.raises(ValueError, match="wrong.pt: weights do not fit a UNet2D\\(in_channels=1, base_channels=8"):
        load_checkpoint(wrong)


def test_export_command_names_a_bad_checkpoint_without_a_traceback(tmp_path, capsys):
    last_style = tmp_path / "last.pt"
    torch.save({"model": {}, "optimizer": {}, "state": {}}, last_style)
    out = tmp_path / "models"
    for checkpoint, message in ((last_style, "last.pt: not a training checkpoint.*use best.pt, or an epochNN.pt"),
                                (tmp_path / "nope.pt", "nope.pt: checkpoint not found")):
        args = ["--checkpoint", str(checkpoint), "--out", str(out), "--name", "x", "--version", "1.0.0"]
        assert export_main(args) == 2
        err = capsys.readouterr().err
        assert re.search(f"^export: .*{message}", err, re.MULTILINE) and "Traceback" not in err
        assert not out.exists() or not list(out.iterdir()), "nothing written"


def test_infection_offset_shifts_only_the_infection_logit(checkpoint_path, tmp_path):
    assert export_main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path), "--name", "strict",
                        "--version", "0.1.0-strict", "--infection-offset", "1.5"]) == 0
    manifest = json.loads((tmp_path / "strict.json").read_text(encoding="utf-8"))
    assert manifest["infection_logit_offset"]["value"] == 1.5
    package = load_model_package(tmp_path / "strict.json")
    reference = load_checkpoint(checkpoint_path).model
    inputs = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        shifted, trained = package.module(inputs), reference(inputs)
    torch.testing.assert_close(shifted[:, :2], trained[:, :2], atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted[:, 2], trained[:, 2] - 1.5, atol=1e-5, rtol=0)


def test_infection_offset_leaves_the_callers_checkpoint_as_trained(checkpoint_path, tmp_path):
    checkpoint = load_checkpoint(checkpoint_path)
    bias = checkpoint.model.head.bias.detach().clone()
    export_checkpoint(checkpoint, tmp_path, "strict", "0.1.0", infection_offset=2.0)
    torch.testing.assert_close(checkpoint.model.head.bias, bias, atol=0, rtol=0)
    exported = load_model_package(tmp_path / "strict.json").module.state_dict()["head.bias"]
    torch.testing.assert_close(exported, bias - torch.tensor([0.0, 0.0, 2.0]), atol=1e-6, rtol=0)


def test_infection_offset_refuses_metrics_of_the_unshifted_network(checkpoint_path, tmp_path):
    with pytest.raises(ValueError, match="evaluate the exported package"):
        export_checkpoint(checkpoint_path, tmp_path, "strict", "0.1.0", metrics={"per_case": {}}, infection_offset=1.0)
    assert not list(tmp_path.iterdir()), "nothing written"


def test_export_is_byte_reproducible_with_a_fixed_string_hash_seed(checkpoint_path, tmp_path, monkeypatch, capsys):
    """Two exports of one checkpoint in two fresh processes with PYTHONHASHSEED=0 write the same bytes (the
    archive's constants follow Python's string hashing); without it, export says so."""
    training = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONHASHSEED": "0",
           "PYTHONPATH": os.pathsep.join([str(training), str(training.parent / "CovidInfectionSeg")])}
    digests = []
    for run in ("a", "b"):
        done = subprocess.run([sys.executable, "-m", "covidseg_training", "export", "--checkpoint", str(checkpoint_path),
                               "--out", str(tmp_path / run), "--name", "pkg", "--version", "1.0.0"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "PYTHONHASHSEED" not in done.stderr
        digests.append(json.loads((tmp_path / run / "pkg.json").read_text(encoding="utf-8"))["sha256"])
    assert (tmp_path / "a" / "pkg.pt").read_bytes() == (tmp_path / "b" / "pkg.pt").read_bytes()
    assert digests[0] == digests[1]
    monkeypatch.setenv("PYTHONHASHSEED", "random")
    assert export_main(["--checkpoint", str(checkpoint_path), "--out", str(tmp_path / "c"), "--name", "pkg",
                        "--version", "1.0.0"]) == 0
    assert "without PYTHONHASHSEED=0" in capsys.readouterr().err


def test_float16_copy_of_a_checkpoint_is_half_the_size_and_computes_nearly_the_same(checkpoint_path, tmp_path):
    """run_v2.sh carries a checkpoint over the GPU machine's file limit as this copy; evaluate, export and
    wholescan read it as they read best.pt, and its record says it was rounded."""
    copy = tmp_path / "best.pt"
    record = save_half_precision_copy(checkpoint_path, copy)
    assert record == {"epoch": 3, "weights": "float16 copy of best.pt"}
    stored = torch.load(copy, weights_only=False)
    assert {value.dtype for value in stored["model"].values() if value.is_floating_point()} == {torch.float16}
    weight_bytes = sum(value.numel() * 4 for value in stored["model"].values() if value.is_floating_point())
    assert checkpoint_path.stat().st_size - copy.stat().st_size >= 0.45 * weight_bytes  # half of them gone
    original, rounded = load_checkpoint(checkpoint_path), load_checkpoint(copy)
    assert rounded.record["weights"] == "float16 copy of best.pt"
    assert next(rounded.model.parameters()).dtype == torch.float32
    inputs = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected, got = original.model(inputs), rounded.model(inputs)
    assert not torch.equal(expected, got)  # rounded, not the same weights
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
    assert export_main(["--checkpoint", str(copy), "--out", str(tmp_path / "models"), "--name", "tiny_unet",
                        "--version", "1.0.0"]) == 0
