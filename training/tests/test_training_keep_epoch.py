"""keep_epoch: which epoch becomes a fold's best.pt, and crossval's report of it (epoch_selection)."""

from __future__ import annotations

import json

import pytest

from covidseg_training.checkpoint import load_checkpoint
from covidseg_training.config import TrainConfig
from covidseg_training.crossval import epoch_selection
from covidseg_training.train import train

EPOCHS = 4


def run(labelled_slices, tmp_path, keep_epoch: str):
    config = TrainConfig.from_dict({
        "name": keep_epoch, "data": str(labelled_slices), "output_dir": str(tmp_path / "runs"), "fold": 0,
        "n_folds": 3, "input_size": 64, "base_channels": 4, "depth": 2, "epochs": EPOCHS, "batch_size": 4,
        "learning_rate": 0.05, "warmup_epochs": 1, "threads": 1, "device": "cpu", "patience": 1,
        "keep_epoch": keep_epoch})
    folder = train(config, log=lambda _: None)
    return folder, json.loads((folder / "history.json").read_text(encoding="utf-8"))


def test_keep_epoch_is_best_or_last():
    with pytest.raises(ValueError, match="keep_epoch must be 'best' or 'last'"):
        TrainConfig.from_dict({"keep_epoch": "average"})


def test_last_keeps_the_last_epoch_whatever_the_validation_and_does_not_stop_early(labelled_slices, tmp_path):
    folder, history = run(labelled_slices, tmp_path, "last")
    assert [record["epoch"] for record in history] == list(range(1, EPOCHS + 1))  # patience 1 stopped nothing
    assert all(record["kept"] for record in history) and "infection_dice" in history[-1]
    assert load_checkpoint(folder / "best.pt").record["epoch"] == EPOCHS
    selection = epoch_selection({0: folder / "eval"})["per_fold"]["0"]
    assert selection["selected_epoch"] == selection["last_epoch"] == EPOCHS


def test_best_marks_the_epoch_that_best_pt_holds_and_crossval_reports_it(labelled_slices, tmp_path):
    folder, history = run(labelled_slices, tmp_path, "best")
    kept = [record["epoch"] for record in history if record["kept"]]
    held = load_checkpoint(folder / "best.pt").record["epoch"]
    assert kept[0] == 1 and kept[-1] == held
    selection = epoch_selection({0: folder / "eval"})["per_fold"]["0"]
    assert selection["selected_epoch"] == held and selection["last_epoch"] == history[-1]["epoch"]
    # the same report from a history written before training marked the kept epoch
    for record in history:
        del record["kept"]
    (folder / "history.json").write_text(json.dumps(history), encoding="utf-8")
    assert epoch_selection({0: folder / "eval"})["per_fold"]["0"]["selected_epoch"] == held
