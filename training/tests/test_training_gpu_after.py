"""training/gpu/after_v2.sh, the script that takes a GPU call's files back here, as a real child process on
the CPU: run_v2.sh's tiny runs (the ``gpu_run`` fixture) unpacked, two folds exported, evaluated again
with flip TTA and checked on whole scans (the check scans and the LIDC scan each fold left out), the
float16 copies evaluated again, the cross-validation copied, the all-data model exported with it and
checked on every scan, and a second call that does not redo a fold. The shared data is a stand-in of
small synthetic scans under the real scans' names (gpu_scripts.write_shared_data)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from CovidInfectionSegLib.checksums import sha256_of
from covidseg_training.negatives import DEFAULT_HOLDOUT
from covidseg_training.wholescan import DEFAULT_SCANS
from gpu_scripts import run_after_script, write_shared_data

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="the GPU scripts need bash and coreutils' timeout")
FOLDS = (0, 1)  # fold 0 leaves LIDC-IDRI-0001 out, fold 1 LIDC-IDRI-0003: the release's rows need both
CHECKS = ["covid-chest-ct", "example-chest-ct-kernel-L", "example-chest-ct-kernel-B"]


@pytest.fixture(scope="module")
def after_run(gpu_run, tmp_path_factory) -> dict:
    shared = write_shared_data(tmp_path_factory.mktemp("shared"))
    training = gpu_run["training"]
    result = run_after_script(training, gpu_run["out"], shared, " ".join(map(str, FOLDS)))
    return {"training": training, "shared": shared, "result": result,
            "results": training / "results" / "v2" / "tiny", "dest": training / "runs" / "gpu"}


def rows(path: Path) -> dict[str, dict[str, str]]:
    return {row["scan"]: row for row in csv.DictReader(path.open(encoding="utf-8"))}


def test_the_script_succeeds(after_run):
    result = after_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("fold", FOLDS)
def test_each_fold_model_is_checked_on_the_check_scans_and_the_lidc_scan_it_left_out(after_run, fold):
    folder = after_run["results"] / f"fold{fold}"
    table = rows(folder / "wholescan.csv")
    held_out = DEFAULT_HOLDOUT[fold][0]
    assert list(table) == [*CHECKS, held_out]
    assert all(row["status"] == "ok" for row in table.values()), table
    assert {row["model_version"] for row in table.values()} == {f"2.0.0-fold{fold}"}
    assert table[held_out]["model_trained_on_scan"] == "no"
    assert table[held_out]["nodule_voxels"] not in ("", "0")  # the stand-in's read, matched by z position
    assert sorted(path.name for path in folder.glob("*.jpg")) == sorted(f"{scan}.jpg" for scan in table)
    for name in ("summary.json", "per_case.csv", "history.json", "wholescan.md"):
        assert (folder / name).is_file(), name


@pytest.mark.parametrize("fold", FOLDS)
def test_a_float16_copy_is_evaluated_again_and_its_package_carries_those_metrics(after_run, fold):
    # run_v2.sh's limit made every tiny best.pt a float16 copy, which is not the file its eval/ measured
    best = after_run["dest"] / "runs" / "tiny" / f"fold{fold}" / "best.pt"
    again = json.loads((after_run["results"] / f"fold{fold}" / "float16" / "summary.json").read_text(encoding="utf-8"))
    first = json.loads((after_run["results"] / f"fold{fold}" / "summary.json").read_text(encoding="utf-8"))
    assert again["evaluated_sha256"] == sha256_of(best) != first["evaluated_sha256"]
    manifest = json.loads((after_run["dest"] / "packages" / f"covid_unet_tiny_fold{fold}.json").read_text(encoding="utf-8"))
    assert manifest["metrics"]["evaluated_sha256"] == sha256_of(best)


@pytest.mark.parametrize("fold", FOLDS)
def test_the_flip_tta_evaluation_is_of_the_exported_package_with_flips(after_run, fold):
    summary = json.loads((after_run["results"] / f"fold{fold}" / "flip_tta" / "summary.json").read_text(encoding="utf-8"))
    package = after_run["dest"] / "packages" / f"covid_unet_tiny_fold{fold}.json"
    assert summary["flip_tta"] is True and summary["fold"] == fold
    assert (after_run["training"] / summary["evaluated_file"]).resolve() == package.resolve()
    assert summary["data"] == "data/ma2020.npz"  # LABELLED, not the config's shared PNG export


def test_the_five_folds_cross_validation_is_copied_and_goes_into_the_release_manifest(after_run):
    summary = json.loads((after_run["results"] / "crossval" / "summary.json").read_text(encoding="utf-8"))
    assert summary["over_folds"]["infection_dice"]["n"] == 5
    manifest = json.loads((after_run["dest"] / "packages" / "covid_unet_v2.json").read_text(encoding="utf-8"))
    assert manifest["version"] == "2.0.0" and manifest["name"] == "covid_unet_v2"
    assert manifest["cross_validation"]["mean_of_fold_means"]["infection_dice"]["mean"] == pytest.approx(
        summary["over_folds"]["infection_dice"]["mean"], abs=1e-3)


def test_the_release_is_checked_on_every_scan_each_lidc_scan_by_a_fold_model_that_left_it_out(after_run):
    table = rows(after_run["results"] / "wholescan_v2.0.0.csv")
    assert list(table) == list(DEFAULT_SCANS)
    assert all(row["status"] == "ok" for row in table.values()), table
    for fold in FOLDS:
        scan = DEFAULT_HOLDOUT[fold][0]
        assert table[scan]["model_file"].endswith(f"covid_unet_tiny_fold{fold}.json"), table[scan]["model_file"]
        assert table[scan]["model_trained_on_scan"] == "no"
    assert {table[scan]["model_version"] for scan in CHECKS} == {"2.0.0"}
    assert len(list((after_run["results"] / "wholescan_v2.0.0").glob("*.jpg"))) == len(DEFAULT_SCANS)


def test_a_second_call_does_not_redo_a_fold(after_run):
    tables = {path: path.read_bytes() for fold in FOLDS
              for path in (after_run["results"] / f"fold{fold}").rglob("*") if path.is_file()}
    result = run_after_script(after_run["training"], after_run["training"] / "runs" / "gpu-out",
                              after_run["shared"], " ".join(map(str, FOLDS)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for fold in FOLDS:
        assert f"fold {fold}: already in" in result.stdout
    assert {path: path.read_bytes() for path in tables} == tables


def test_a_single_fold_screen_copies_no_cross_validation_and_makes_no_release(after_run, tmp_path):
    # A screen trained here: fold 1 alone, whose own `crossval --folds 1` left a one-fold aggregate, and an
    # all-data model beside it. Fold 1's tables and package are those of the call above, so it is not redone.
    from covidseg_training.crossval import aggregate

    training = tmp_path / "training"
    for folder in ("gpu", "configs", "data"):
        shutil.copytree(after_run["training"] / folder, training / folder)
    runs = training / "runs"
    for run in ("tiny/fold1", "tiny_all"):
        shutil.copytree(after_run["dest"] / "runs" / run, runs / run)
    aggregate({1: runs / "tiny" / "fold1" / "eval"}, runs / "tiny" / "crossval")
    results = training / "results" / "v2" / "tiny"
    shutil.copytree(after_run["results"] / "fold1", results / "fold1")
    packages = runs / "gpu" / "packages"
    packages.mkdir(parents=True)
    for package in (after_run["dest"] / "packages").glob("covid_unet_tiny_fold1.*"):
        shutil.copy2(package, packages / package.name)
    result = run_after_script(training, runs, after_run["shared"], "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fold 1: already in" in result.stdout
    assert "cross-validation: 1 of 5 folds evaluated; none copied, no release" in result.stdout
    assert not (results / "crossval").exists()
    assert not list(packages.glob("covid_unet_v2.*"))
