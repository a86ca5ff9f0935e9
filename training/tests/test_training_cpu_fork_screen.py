"""training/cpu/fork_screen.sh as a real child process, in a training/ tree of its own. A tiny arm
(masses from epoch 3 of 4) is screened against a tiny control that shares its epochs 1-2. The shared
data is the stand-in of small synthetic scans under the real scans' names (gpu_scripts.write_shared_data).
Then:
- a second call finds everything done and redoes nothing;
- bad settings are refused before anything is trained;
- an arm already past the fork without its control is refused."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from gpu_scripts import TINY, script_env, write_shared_data
from labelled_slices import write_labelled_slices

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the script needs bash")
SCRIPT = Path(__file__).resolve().parents[1] / "cpu" / "fork_screen.sh"
FOLD, FORK, LAST = 0, 2, 4
HELD_OUT = "LIDC-IDRI-0001"  # fold 0's (negatives.DEFAULT_HOLDOUT)
ARM = {**TINY, "name": "tiny_arm", "epochs": LAST, "keep_from_epoch": 1,
       "augment": {"mass_p": 1.0, "mass_halo_p": 0.5, "mass_from_epoch": FORK + 1}}
CONTROL = {**TINY, "name": "tiny_control", "epochs": LAST, "keep_from_epoch": 3}


def make_tree(root: Path) -> Path:
    training = root / "training"
    (training / "cpu").mkdir(parents=True)
    shutil.copy2(SCRIPT, training / "cpu" / SCRIPT.name)
    (training / "configs").mkdir()
    for config in (ARM, CONTROL):
        (training / "configs" / f"{config['name']}.yaml").write_text(yaml.safe_dump(config))
    (training / "data").mkdir()
    write_labelled_slices(training / "data" / "ma2020.npz")
    return training


def run_screen(training: Path, shared: Path, fold: int = FOLD, **settings: str) -> subprocess.CompletedProcess:
    env = script_env(training, **{"ARM": "tiny_arm", "CONTROL": "tiny_control", "SHARED": str(shared), **settings})
    return subprocess.run(["bash", str(training / "cpu" / "fork_screen.sh"), str(fold)], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=900)


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> dict:
    training = make_tree(tmp_path_factory.mktemp("tree"))
    shared = write_shared_data(tmp_path_factory.mktemp("shared"))
    first = run_screen(training, shared)
    packages = training / "runs" / "screen" / f"fork_fold{FOLD}" / "packages"
    stamps = {path.name: path.stat().st_mtime_ns for path in packages.iterdir()}
    own = training / "own"  # a control config's own run of the fold, for scale: here the control's copied tables
    own.mkdir()
    if (training / "results" / "v2" / "tiny_arm" / f"fold{FOLD}_control" / "wholescan_epoch3.csv").exists():
        shutil.copy2(training / "results" / "v2" / "tiny_arm" / f"fold{FOLD}_control" / "wholescan_epoch3.csv", own)
    second = run_screen(training, shared, OWN=str(own))
    return {"training": training, "shared": shared, "first": first, "second": second, "packages": packages,
            "stamps": stamps, "runs": training / "runs" / "screen", "results": training / "results" / "v2" / "tiny_arm"}


def without_timing(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "seconds"} for record in history]


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "history.json").read_text(encoding="utf-8"))


def test_the_script_succeeds_and_says_what_it_screens(screen):
    result = screen["first"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"fold 0: tiny_arm against tiny_control, sharing epochs 1-{FORK} of {LAST}; held-out scan {HELD_OUT}" \
        in result.stdout
    assert f"forked at epoch {FORK}" in result.stdout


def test_the_control_shares_the_epochs_before_the_fork_and_differs_after(screen):
    arm = history(screen["runs"] / "tiny_arm" / "fold0")
    control = history(screen["runs"] / "tiny_control" / "fold0")
    assert [record["epoch"] for record in arm] == [record["epoch"] for record in control] == list(range(1, LAST + 1))
    assert without_timing(control[:FORK]) == without_timing(arm[:FORK])
    assert control[FORK]["loss"] != arm[FORK]["loss"], "the arm's masses start at the first epoch after the fork"
    for run in ("tiny_arm", "tiny_control"):
        last = torch.load(screen["runs"] / run / "fold0" / "last.pt", map_location="cpu", weights_only=False)
        assert last["state"]["epoch"] == LAST, run
    assert (screen["runs"] / "tiny_arm" / "fold0" / "eval" / "summary.json").is_file(), "crossval evaluated the arm"


@pytest.mark.parametrize("folder, version", [
    ("fold0/epoch4", "fork-fold0-arm_e4"), ("fold0/epoch2", "fork-fold0-shared_e2"),
    ("fold0_control/epoch4", "fork-fold0-control_e4"), ("fold0_control/offset1", "fork-fold0-control_e4_offset1"),
    ("fold0_control/offset2", "fork-fold0-control_e4_offset2")])
def test_each_checkpoint_is_checked_on_the_whole_scans_and_the_held_out_slices(screen, folder, version):
    tables = screen["results"] / folder
    rows = list(csv.DictReader((tables / "wholescan.csv").open(encoding="utf-8")))
    assert [row["scan"] for row in rows] == ["covid-chest-ct", "example-chest-ct-kernel-L",
                                             "example-chest-ct-kernel-B", HELD_OUT]
    assert all(row["status"] == "ok" and row["model_version"] == version for row in rows), rows
    assert rows[-1]["model_trained_on_scan"] == "no"
    summary = json.loads((tables / "summary.json").read_text(encoding="utf-8"))
    assert summary["fold"] == FOLD and summary["evaluated_file"].endswith(f"covid_unet_{version[len('fork-fold0-'):]}.json")
    assert (tables / "per_case.csv").is_file()


def test_the_epochs_between_are_checked_and_the_previews_and_histories_copied(screen):
    results = screen["results"]
    for folder, run in (("fold0", "tiny_arm"), ("fold0_control", "tiny_control")):
        assert (results / folder / "wholescan_epoch3.csv").is_file() and (results / folder / "wholescan_epoch3.md").is_file()
        assert history(results / folder) == history(screen["runs"] / run / "fold0")
    for folder in ("fold0/epoch4", "fold0_control/epoch4"):
        assert sorted(path.name for path in (results / folder).glob("*.jpg")) == sorted(
            f"{scan}.jpg" for scan in ["covid-chest-ct", "example-chest-ct-kernel-L", "example-chest-ct-kernel-B", HELD_OUT])


def test_the_trade_off_has_every_checkpoint_and_the_own_run_on_the_second_call(screen):
    table = (screen["results"] / "tradeoff_fold0.md").read_text(encoding="utf-8")
    names = ["epoch 2 (shared)", "control e4", "control e4 offset 1", "control e4 offset 2", "arm e4", "control e3",
             "arm e3", "own run e3"]
    for name in names:
        assert f"| {name} |" in table, name
    assert (screen["results"] / "tradeoff_fold0.png").stat().st_size > 10_000


def test_a_second_call_redoes_nothing(screen):
    result = screen["second"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "forked" not in result.stdout
    assert {path.name: path.stat().st_mtime_ns for path in screen["packages"].iterdir()} == screen["stamps"]
    assert len(history(screen["runs"] / "tiny_control" / "fold0")) == LAST


@pytest.mark.parametrize("fold, settings, message", [
    (7, {}, "fold 7: tiny_arm has folds 0 to 4"),
    (0, {"FORK": "4"}, "FORK 4: the last shared epoch must be 1 to 3"),
    (0, {"CONTROL": "tiny_absent"}, "configs/tiny_absent.yaml: no such config"),
])
def test_bad_settings_are_refused_before_anything_trains(screen, tmp_path, fold, settings, message):
    result = run_screen(screen["training"], screen["shared"], fold=fold, OUT=str(tmp_path / "out"), **settings)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert list((tmp_path / "out").iterdir()) == [], "nothing written"


def test_an_arm_past_the_fork_without_its_control_is_refused(screen, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(screen["runs"] / "tiny_arm" / "fold0", out / "tiny_arm" / "fold0")
    result = run_screen(screen["training"], screen["shared"], OUT=str(out))
    assert result.returncode == 2 and "was never forked from it: remove" in result.stderr, result.stderr[-3000:]
    assert not (out / "tiny_control").exists()
