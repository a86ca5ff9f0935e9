"""A run stopped between epochs and started again ends where it would have ended without the stop.

Folds on a 2-core CPU take longer than one session, so they are trained over several, each resuming
from ``last.pt``; the cross-validation's figures are only those of the recipe if a resumed run is the
same run. Here the stop is a KeyboardInterrupt (as Ctrl-C gives) raised right after an epoch's line
is logged, when its checkpoints are written (a killed run leaves the same: each file is written whole
and renamed into place), in a tiny run with deep supervision and hard negatives, whose every
epoch draws its slices, augmentation and negatives from the seed, the epoch and the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from covidseg_training.config import TrainConfig
from covidseg_training.data import INFECTION, LUNG
from covidseg_training.train import train
from labelled_slices import write_labelled_slices

EPOCHS = 3


def mostly_infected_slices(path):
    """The tiny labelled slices, nearly all infection: after one epoch at a high learning rate the model
    calls infection on the negatives too, so epochs 2 and 3 draw hard negatives from it."""
    labels = np.full((12, 64, 64), INFECTION, dtype=np.uint8)
    labels[:, :8] = LUNG
    return write_labelled_slices(path, labels)


def tiny_config(data, root, chest_file, name: str) -> TrainConfig:
    return TrainConfig.from_dict({
        "name": name, "data": str(data), "output_dir": str(root / "runs"),
        "fold": 0, "n_folds": 3, "input_size": 64, "base_channels": 4, "depth": 2, "epochs": EPOCHS,
        "keep_from_epoch": 2, "batch_size": 4, "learning_rate": 0.2, "warmup_epochs": 1, "threads": 1,
        "device": "cpu", "deep_supervision": True,
        "negatives": {"scans": [chest_file.name], "per_epoch": 6, "hard_share": 0.5, "root": str(chest_file.parent)},
    })


def stop_after_epoch(epoch: int):
    def log(line: str) -> None:
        if line.startswith("{") and json.loads(line.rstrip(" *"))["epoch"] == epoch:
            raise KeyboardInterrupt
    return log


def without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in history]


def saved(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(chest_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = mostly_infected_slices(root / "labelled.npz")
    whole = train(tiny_config(data, root, chest_file, "whole"), log=lambda _: None)
    config = tiny_config(data, root, chest_file, "stopped")
    with pytest.raises(KeyboardInterrupt):
        train(config, log=stop_after_epoch(1))
    stopped_at = json.loads((root / "runs" / "stopped" / "fold0" / "history.json").read_text())
    messages: list[str] = []
    resumed = train(config, log=messages.append)
    # --stop-after: the same pause asked for, as training/cpu/fork_screen.sh does before it forks a control
    paused_config = tiny_config(data, root, chest_file, "paused")
    paused = train(paused_config, log=lambda _: None, stop_after=2)
    paused_at = json.loads((paused / "history.json").read_text())
    paused_last = saved(paused / "last.pt")["state"]["epoch"]
    train(paused_config, log=lambda _: None)
    with pytest.raises(ValueError, match="at epoch 3, past --stop-after 2"):
        train(paused_config, log=lambda _: None, stop_after=2)
    return {"whole": whole, "resumed": resumed, "stopped_at": stopped_at, "messages": messages, "paused": paused,
            "paused_at": paused_at, "paused_last": paused_last}


def test_the_stop_left_one_epoch_and_the_restart_resumed_it(runs):
    assert [record["epoch"] for record in runs["stopped_at"]] == [1]
    assert any(message.startswith("resumed ") and message.endswith("at epoch 1") for message in runs["messages"])
    assert sum(message.startswith("{") for message in runs["messages"]) == EPOCHS - 1, "epochs 2 and 3 only"


def test_a_resumed_run_has_the_history_of_a_run_that_was_not_stopped(runs):
    whole = json.loads((runs["whole"] / "history.json").read_text())
    resumed = json.loads((runs["resumed"] / "history.json").read_text())
    assert [record["epoch"] for record in resumed] == list(range(1, EPOCHS + 1))
    assert [record["slices"]["hard_negative"] for record in whole] == [0, 3, 3], "drawn by the model from epoch 2"
    assert without_timing(resumed) == without_timing(whole)


def test_stop_after_ends_the_call_at_that_epoch_and_the_next_call_goes_on_as_one_run(runs):
    assert [record["epoch"] for record in runs["paused_at"]] == [1, 2] and runs["paused_last"] == 2
    whole = json.loads((runs["whole"] / "history.json").read_text())
    assert without_timing(json.loads((runs["paused"] / "history.json").read_text())) == without_timing(whole)


def test_stop_after_must_be_an_epoch_of_the_run(tmp_path):
    config = TrainConfig.from_dict({"name": "never", "epochs": 3, "output_dir": str(tmp_path)})
    for epoch in (0, 4):
        with pytest.raises(ValueError, match=r"stop_after must be an epoch of the run \(1 to 3\)"):
            train(config, log=lambda _: None, stop_after=epoch)
    assert not (tmp_path / "never").exists(), "refused before anything was written"


def test_the_cli_refuses_a_stop_after_outside_the_run_in_one_line(tmp_path):
    config = tmp_path / "never.yaml"
    config.write_text(yaml.safe_dump({"name": "never", "epochs": 3, "output_dir": str(tmp_path / "runs")}))
    done = subprocess.run([sys.executable, "-m", "covidseg_training", "train", str(config), "--stop-after", "4"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == "train: stop_after must be an epoch of the run (1 to 3), not 4"
    assert not (tmp_path / "runs" / "never").exists(), "refused before anything was written"


@pytest.mark.parametrize("name", ["last.pt", "best.pt", "epoch02.pt", "epoch03.pt"])
@pytest.mark.parametrize("run", ["resumed", "paused"])
def test_a_resumed_run_ends_with_the_same_weights(runs, name, run):
    whole, resumed = saved(runs["whole"] / name), saved(runs[run] / name)
    for key, value in whole["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=f"{name}: {key}")
    if name == "last.pt":
        assert resumed["state"]["step"] == whole["state"]["step"]
        for index, moments in whole["optimizer"]["state"].items():
            torch.testing.assert_close(resumed["optimizer"]["state"][index]["exp_avg"], moments["exp_avg"],
                                       rtol=0, atol=0, msg=f"AdamW moment of parameter {index}")
