"""``average``: a run's kept epochs averaged into one checkpoint that evaluates and exports like best.pt."""

from __future__ import annotations

import pytest
import torch

from covidseg_training.__main__ import main as cli
from covidseg_training.average import average_checkpoints, training_batches
from covidseg_training.checkpoint import load_checkpoint
from covidseg_training.config import TrainConfig
from covidseg_training.train import network_batch, train
from labelled_slices import write_labelled_slices


@pytest.fixture(scope="module")
def kept_run(chest_file, tmp_path_factory):
    """A tiny run on random labelled slices and the synthetic negative chest, epochs 2-4 kept."""
    root = tmp_path_factory.mktemp("average")
    config = TrainConfig.from_dict({
        "name": "kept", "data": str(write_labelled_slices(root / "labelled.npz")), "output_dir": str(root / "runs"), "fold": 0,
        "n_folds": 3, "input_size": 64, "base_channels": 4, "depth": 2, "epochs": 4, "keep_from_epoch": 2,
        "batch_size": 4, "learning_rate": 0.01, "threads": 1, "device": "cpu", "deep_supervision": True,
        "negatives": {"scans": [chest_file.name], "per_epoch": 6, "root": str(chest_file.parent)},
    })
    run = train(config, log=lambda _: None)
    return {"run": run, "config": config, "epochs": [run / f"epoch0{n}.pt" for n in (2, 3, 4)]}


def saved_weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_averaged_weights_are_the_mean_of_the_kept_epochs(kept_run, tmp_path):
    out = tmp_path / "averaged.pt"
    assert cli(["average", *map(str, kept_run["epochs"]), "--out", str(out)]) == 0
    kept = [saved_weights(path) for path in kept_run["epochs"]]
    averaged = saved_weights(out)
    assert not any(name.startswith("auxiliary.") for name in averaged), "the training-only heads are left out"
    assert averaged, "weights were saved"
    differing = 0
    for name, value in averaged.items():
        if value.is_floating_point():
            expected = (kept[0][name] + kept[1][name] + kept[2][name]) / 3
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=name)
            differing += not torch.equal(kept[0][name], kept[2][name])
        else:
            assert torch.equal(value, kept[2][name]), name
    assert differing > 10, "the kept epochs differ, so the mean is not any one of them"
    checkpoint = load_checkpoint(out)
    assert checkpoint.record["averaged_epochs"] == [2, 3, 4]
    assert checkpoint.record["batch_norm"] == "averaged"
    assert 0.0 <= checkpoint.record["lung_dice"] <= 1.0 and 0.0 <= checkpoint.record["infection_dice"] <= 1.0


def test_recalibrated_batch_norm_matches_torch_update_bn_over_a_training_epoch(kept_run, tmp_path):
    """The statistics are measured again over one epoch of augmented training batches (labelled training
    slices and negatives): the same as torch.optim.swa_utils.update_bn over those batches, and not the
    averaged statistics."""
    out = tmp_path / "recalibrated.pt"
    record = average_checkpoints(kept_run["epochs"], out, recalibrate=True, log=lambda _: None)
    assert record["batch_norm"].startswith("measured again on one augmented training epoch (12 inputs"), \
        "(8 labelled + 6 negative) // batch size 4 = 3 batches"
    recalibrated = load_checkpoint(out).model

    reference = load_checkpoint(kept_run["epochs"][0]).model
    reference.load_state_dict(saved_weights(out))  # the same averaged weights ...
    batches = [network_batch(images) for images in training_batches(kept_run["config"], 4, log=lambda _: None)]
    assert len(batches) == 3 and all(len(images) == 4 for images in batches)
    torch.optim.swa_utils.update_bn(batches, reference)  # ... with torch's own recalibration
    without = saved_weights(kept_run["epochs"][0])
    compared = 0
    for name, module in recalibrated.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            expected = dict(reference.named_modules())[name]
            torch.testing.assert_close(module.running_mean, expected.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(module.running_var, expected.running_var, rtol=1e-5, atol=1e-6)
            assert module.momentum == 0.1, "the layer's momentum is put back"
            assert not torch.allclose(module.running_mean, without[f"{name}.running_mean"])
            compared += 1
    assert compared >= 4


def test_averaged_checkpoint_exports(kept_run, tmp_path):
    out = tmp_path / "averaged.pt"
    average_checkpoints(kept_run["epochs"][:2], out, recalibrate=False, log=lambda _: None)
    assert cli(["export", "--checkpoint", str(out), "--out", str(tmp_path / "models"), "--name", "kept_averaged",
                "--version", "0.1.0-averaged"]) == 0
    assert (tmp_path / "models" / "kept_averaged.json").exists()


def test_bad_input_is_refused_and_writes_nothing(kept_run, tmp_path, capsys):
    epochs = [str(path) for path in kept_run["epochs"]]
    out = tmp_path / "averaged.pt"
    assert cli(["average", epochs[0], "--out", str(out)]) == 2
    assert "at least two checkpoints" in capsys.readouterr().err
    assert cli(["average", epochs[0], epochs[0], "--out", str(out)]) == 2
    assert "named twice" in capsys.readouterr().err
    assert cli(["average", *epochs, "--out", epochs[1]]) == 2
    assert "would overwrite one of the averaged checkpoints" in capsys.readouterr().err
    assert cli(["average", epochs[0], str(kept_run["run"] / "last.pt"), "--out", str(out)]) == 2
    assert "last.pt holds no config" in capsys.readouterr().err

    other_fold = dict(torch.load(epochs[0], weights_only=False))
    other_fold["config"] = {**other_fold["config"], "fold": 1}
    torch.save(other_fold, tmp_path / "other.pt")
    assert cli(["average", epochs[0], str(tmp_path / "other.pt"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "not from the same run" in error and "(fold differ)" in error
    assert not out.exists()
    assert cli(["average", epochs[0], str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not out.exists()
