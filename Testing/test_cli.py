"""The ``covidseg`` command in-process: real TorchScript model, real files, exit codes."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CovidInfectionSegLib.batch import find_scans, scan_stem
from CovidInfectionSegLib.cli import (
    EXIT_CANCELLED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_OUTPUT_IN_USE,
    EXIT_SCANS_FAILED,
    EXIT_USAGE,
    cancel_on_sigint,
    main,
)
from CovidInfectionSegLib.sample_data import synthetic_chest
from dicom_series import write_dicom_series
from model_factory import write_model_package
from phantoms import chest_phantom, lung_and_infection_net

ALL_SUFFIXES = (".seg.nrrd", ".labels.nii.gz", ".measurements.csv", ".measurements.json", ".preview.png")


def small_chest(seed: int = 0) -> sitk.Image:
    return synthetic_chest(size=(80, 72, 12), spacing=(4.0, 4.0, 10.0), seed=seed)


@pytest.fixture
def scans(tmp_path) -> Path:
    """Two good scans (NIfTI, NRRD) and one damaged NIfTI."""
    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(small_chest(0), str(folder / "alpha.nii.gz"))
    sitk.WriteImage(small_chest(1), str(folder / "beta.nrrd"))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    (folder / "notes.txt").write_text("not a scan; ignored")
    return folder


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["scan"]: row for row in csv.DictReader(handle)}


def test_segment_writes_every_output(tmp_path, scans, tiny_model_manifest, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(scans / "alpha.nii.gz"), "-o", str(out), "--model", str(tiny_model_manifest),
                 "--device", "cpu", "--batch-size", "5"])
    assert code == EXIT_OK
    for suffix in ALL_SUFFIXES:
        assert (out / f"alpha{suffix}").stat().st_size > 0, suffix
    printed = capsys.readouterr().out
    assert "Both lungs:" in printed and "severity grade" in printed
    segmentation = slicerio.read_segmentation(str(out / "alpha.seg.nrrd"))
    assert [s["name"] for s in segmentation["segments"]] == ["Right lung", "Left lung", "Infection"]
    labels = sitk.ReadImage(str(out / "alpha.labels.nii.gz"))
    assert labels.GetSize() == (80, 72, 12)
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2, 3}
    record = json.loads((out / "alpha.measurements.json").read_text(encoding="utf-8"))
    assert record["source"] == str(scans / "alpha.nii.gz")
    assert record["measurements"]["total"]["lung_ml"] > 0


def test_segment_prints_what_the_post_processing_changed(tmp_path, capsys):
    """The notes of the JSON (specks dropped, a small solid blob called lung, not infection) are printed
    too, so that a changed call is not found only by reading the JSON; -q prints none of them."""
    model = write_model_package(tmp_path / "model", lung_and_infection_net(), "lunginf")
    scan = tmp_path / "phantom.nii.gz"
    sitk.WriteImage(chest_phantom(shape=(20, 112, 112), spacing=(1.5, 1.5, 2.5), infection_in_right=True).image(),
                    str(scan))
    assert main(["segment", str(scan), "-o", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]) == EXIT_OK
    printed = capsys.readouterr().out
    notes = json.loads((tmp_path / "out" / "phantom.measurements.json").read_text(encoding="utf-8"))["notes"]
    assert any("small solid components" in note for note in notes), notes
    for note in notes:
        assert f"post-processing: {note}\n" in printed
    assert main(["segment", str(scan), "-o", str(tmp_path / "quiet"), "--model", str(model), "--device", "cpu",
                 "-q"]) == EXIT_OK
    assert capsys.readouterr().out == ""


def test_no_nodule_check_keeps_small_solid_components_as_infection(tmp_path):
    """The phantom's infection is a small solid blob: by default it is taken for a nodule and made lung (a
    note says so); with --no-nodule-check it stays infection, and the JSON records which was done."""
    model = write_model_package(tmp_path / "model", lung_and_infection_net(), "lunginf")
    phantom = chest_phantom(shape=(20, 112, 112), spacing=(1.5, 1.5, 2.5), infection_in_right=True)
    scan = tmp_path / "phantom.nii.gz"
    sitk.WriteImage(phantom.image(), str(scan))
    records = {}
    for flag, checked in (([], True), (["--no-nodule-check"], False)):
        out = tmp_path / str(checked)
        assert main(["segment", str(scan), "-o", str(out), "--model", str(model), "--device", "cpu", "-q",
                     "--no-preview", *flag]) == EXIT_OK
        records[checked] = json.loads((out / "phantom.measurements.json").read_text(encoding="utf-8"))
        assert records[checked]["nodule_check"] is checked
    assert records[True]["measurements"]["total"]["infection_ml"] == 0.0
    assert any("small solid components" in note for note in records[True]["notes"])
    kept = records[False]["measurements"]["total"]["infection_ml"]
    assert kept == pytest.approx(np.count_nonzero(phantom.infection) * phantom.voxel_ml, rel=0.05)
    assert not any("small solid components" in note for note in records[False]["notes"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "False" / "phantom.labels.nii.gz")))
    assert np.count_nonzero(labels == 3) == np.count_nonzero(phantom.infection & (labels > 0))


def test_segment_without_preview(tmp_path, scans, tiny_model_manifest):
    out = tmp_path / "out"
    assert main(["segment", str(scans / "beta.nrrd"), "-o", str(out), "--model", str(tiny_model_manifest),
                 "--no-preview", "-q"]) == EXIT_OK
    assert (out / "beta.seg.nrrd").exists() and not (out / "beta.preview.png").exists()


def test_segment_bad_input_and_bad_output_are_usage_errors(tmp_path, scans, tiny_model_manifest, capsys):
    model = ["--model", str(tiny_model_manifest), "-q"]
    assert main(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o1"), *model]) == EXIT_USAGE
    assert "missing.nii.gz: no such file" in capsys.readouterr().err
    assert main(["segment", str(scans / "broken.nii.gz"), "-o", str(tmp_path / "o2"), *model]) == EXIT_USAGE
    assert "broken.nii.gz" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["segment", str(scans / "alpha.nii.gz"), "-o", str(a_file), *model]) == EXIT_USAGE
    assert "is an existing file" in capsys.readouterr().err
    assert main(["segment", str(scans / "alpha.nii.gz"), "-o", str(a_file / "sub"), *model]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["segment", "-o", str(tmp_path / "o3"), "--batch-size", "0"]) == EXIT_USAGE
    assert main([]) == EXIT_USAGE


def test_model_errors_exit_3(tmp_path, scans, capsys):
    code = main(["segment", str(scans / "alpha.nii.gz"), "-o", str(tmp_path / "o"), "--model",
                 str(tmp_path / "nope.json")])
    assert code == EXIT_MODEL
    assert "nope.json" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "nope.json")]) == EXIT_MODEL


def test_batch_goes_past_a_bad_file_resumes_and_overwrites(tmp_path, scans, tiny_model_manifest, capsys):
    out = tmp_path / "batch"
    args = ["batch", str(scans), "-o", str(out), "--model", str(tiny_model_manifest), "-q"]
    assert main(args) == EXIT_SCANS_FAILED
    summary = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in summary.items()} == {"alpha": "ok", "beta": "ok", "broken": "failed"}
    assert "broken.nii.gz" in summary["broken"]["error"]
    assert float(summary["alpha"]["total_lung_ml"]) > 0 and summary["alpha"]["total_grade"] != ""
    assert float(summary["alpha"]["seconds"]) > 0
    for name in ("alpha", "beta"):
        for suffix in ALL_SUFFIXES:
            assert (out / name / f"{name}{suffix}").is_file()
    assert "failed: broken" in capsys.readouterr().err
    finished = (out / "alpha" / "alpha.seg.nrrd").stat().st_mtime_ns

    assert main(args) == EXIT_SCANS_FAILED  # resumed: finished scans skipped, the bad one tried again
    again = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in again.items()} == {"alpha": "skipped", "beta": "skipped", "broken": "failed"}
    assert again["alpha"]["total_lung_ml"] == summary["alpha"]["total_lung_ml"]  # read back from the outputs
    assert (out / "alpha" / "alpha.seg.nrrd").stat().st_mtime_ns == finished

    (scans / "broken.nii.gz").unlink()
    assert main([*args, "--overwrite"]) == EXIT_OK
    redone = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in redone.items()} == {"alpha": "ok", "beta": "ok"}
    assert (out / "alpha" / "alpha.seg.nrrd").stat().st_mtime_ns != finished


def test_batch_needs_a_folder_with_scans(tmp_path, tiny_model_manifest):
    empty = tmp_path / "empty"
    empty.mkdir()
    model = ["--model", str(tiny_model_manifest), "-q"]
    assert main(["batch", str(empty), "-o", str(tmp_path / "o"), *model]) == EXIT_USAGE
    assert main(["batch", str(tmp_path / "absent"), "-o", str(tmp_path / "o"), *model]) == EXIT_USAGE


def test_find_scans_lists_files_and_dicom_folders_and_skips_the_output(tmp_path, scans):
    write_dicom_series(small_chest(2), scans / "patient7" / "series1")
    (scans / "out").mkdir()
    sitk.WriteImage(small_chest(3), str(scans / "out" / "previous.nii.gz"))
    found = find_scans(scans, exclude=scans / "out")
    assert [scan.name for scan in found] == ["alpha", "beta", "broken", "patient7/series1"]
    assert found[3].path == scans / "patient7" / "series1" and found[3].stem == "series1"
    assert scan_stem(Path("x/ct.nii.gz")) == "ct" and scan_stem(Path("x/ct.mha")) == "ct"


def test_batch_segments_a_dicom_series(tmp_path, tiny_model_manifest):
    folder = tmp_path / "in"
    write_dicom_series(small_chest(4), folder / "series1")
    out = tmp_path / "out"
    assert main(["batch", str(folder), "-o", str(out), "--model", str(tiny_model_manifest), "-q", "--no-preview"]) == EXIT_OK
    assert read_summary(out / "summary.csv")["series1"]["status"] == "ok"
    labels = sitk.ReadImage(str(out / "series1" / "series1.labels.nii.gz"))
    assert labels.GetSize() == (80, 72, 12)


def test_info_prints_model_and_device(tiny_model_manifest, capsys):
    assert main(["info", "--model", str(tiny_model_manifest)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "model:     tiny 0.0.1" in printed
    assert "sha256:    " + json.loads(Path(tiny_model_manifest).read_text(encoding="utf-8"))["sha256"] in printed
    assert "labels:    0 background, 1 lung, 2 infection" in printed
    assert "licence:   Apache-2.0" in printed
    assert "torch:" in printed and "CUDA:" in printed and "device:    auto ->" in printed


def test_info_is_readable_and_json_prints_the_whole_manifest(tiny_model_manifest, tmp_path, capsys):
    manifest = json.loads(Path(tiny_model_manifest).read_text(encoding="utf-8"))
    assert main(["info", "--model", str(tiny_model_manifest)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "recipe:    input_size 256" in printed
    assert "cross-validation: not in the manifest" in printed
    assert max(len(line) for line in printed.splitlines()) < 400  # no 5,000-character JSON line

    assert main(["info", "--json", "--model", str(tiny_model_manifest)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == manifest

    # a manifest with the cross-validation summary the model issue adds: the mean of the fold means per metric
    from model_factory import write_model_package

    with_cv = write_model_package(tmp_path / "cv")
    record = json.loads(with_cv.read_text(encoding="utf-8"))
    record["cross_validation"] = {"folds": [0, 1, 2, 3, 4], "mean_of_fold_means": {
        "lung_dice": {"mean": 0.98, "sd": 0.005}, "infection_dice": {"mean": 0.721, "sd": 0.079}, "infection_nsd": 0.8}}
    with_cv.write_text(json.dumps(record), encoding="utf-8")
    assert main(["info", "--model", str(with_cv)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "cross-validation (5 folds, mean over folds):" in printed
    assert "lung_dice 0.980 +- 0.005, infection_dice 0.721 +- 0.079, infection_nsd 0.800" in printed
    assert "last epoch" not in printed

    # and the same Dice at each fold's last epoch, where the fold's own cases did not pick the epoch
    record["cross_validation"]["at_last_epoch"] = {"lung_dice": {"mean": 0.979, "sd": 0.004},
                                                   "infection_dice": {"mean": 0.702, "sd": 0.09}, "note": "text"}
    with_cv.write_text(json.dumps(record), encoding="utf-8")
    assert main(["info", "--model", str(with_cv)]) == EXIT_OK
    assert ("at each fold's last epoch: lung_dice 0.979 +- 0.004, infection_dice 0.702 +- 0.090\n"
            in capsys.readouterr().out)


def test_batch_resegments_a_changed_input_and_leaves_out_its_own_outputs(tmp_path, scans, tiny_model_manifest, capsys):
    (scans / "broken.nii.gz").unlink()
    out = scans / "results"  # inside the input folder
    args = ["batch", str(scans), "-o", str(out), "--model", str(tiny_model_manifest), "--no-preview"]
    assert main(args) == EXIT_OK
    first = read_summary(out / "summary.csv")
    sitk.WriteImage(small_chest(7), str(scans / "alpha.nii.gz"))  # replaced by another scan
    assert main(args) == EXIT_OK
    second = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in second.items()} == {"alpha": "ok", "beta": "skipped"}
    assert second["alpha"]["note"].startswith("segmented: input changed since the previous run")
    assert second["alpha"]["total_lung_ml"] != first["alpha"]["total_lung_ml"]
    printed = capsys.readouterr()
    assert "results" not in printed.out.split("scans in")[0]  # the output folder is never a scan
    assert "\x1b[" not in printed.err and "\r" not in printed.err  # not a terminal: no bars, no escape codes
    assert "[1/2] alpha: ok" in printed.out


def test_segment_progress_in_a_log_is_plain_lines(tmp_path, scans, tiny_model_manifest, capsys):
    assert main(["segment", str(scans / "alpha.nii.gz"), "-o", str(tmp_path / "o"), "--model", str(tiny_model_manifest),
                 "--batch-size", "3", "--no-preview"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "segmenting alpha: 12/12 slices" in err and "\x1b[" not in err and "\r" not in err


def test_summary_that_cannot_be_written_exits_4_before_any_scan(tmp_path, scans, tiny_model_manifest, capsys):
    out = tmp_path / "out"
    (out / "summary.csv").mkdir(parents=True)
    assert main(["batch", str(scans), "-o", str(out), "--model", str(tiny_model_manifest), "-q"]) == EXIT_OUTPUT_IN_USE
    err = capsys.readouterr().err
    assert "cannot write the batch summary" in err and "it is a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["summary.csv"]


def test_first_ctrl_c_asks_to_stop_second_stops_now():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with cancel_on_sigint(quiet=True) as cancel:
            signal.raise_signal(signal.SIGINT)
            assert cancel.is_set()
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_batch_exits_130_with_the_summary_so_far(tmp_path, scans, tiny_model_manifest, monkeypatch):
    # Ctrl-C arrives while the second scan is being read: the first scan's row is kept.
    from CovidInfectionSegLib import pipeline

    real_read = pipeline.read_image
    calls = []

    def read_then_interrupt(path, warnings=None):
        calls.append(path)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_read(path, warnings)

    monkeypatch.setattr(pipeline, "read_image", read_then_interrupt)
    out = tmp_path / "out"
    code = main(["batch", str(scans), "-o", str(out), "--model", str(tiny_model_manifest), "-q", "--no-preview"])
    assert code == EXIT_CANCELLED
    assert {name: row["status"] for name, row in read_summary(out / "summary.csv").items()} == {"alpha": "ok"}
    assert not (out / "beta" / "beta.seg.nrrd").exists()


def test_segment_without_input_says_it_runs_on_the_phantom_when_offline(tmp_path, tiny_model_manifest, monkeypatch, capsys):
    import functools

    from CovidInfectionSegLib import cli
    from CovidInfectionSegLib.sample_data import load_default_input

    with socket.socket() as probe:  # a port nothing listens on: the download fails at once
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}/CT-chest.nrrd"
    monkeypatch.setattr(cli, "load_default_input",
                        functools.partial(load_default_input, url=dead_url, cache=tmp_path / "cache", timeout=5))
    out = tmp_path / "out"
    assert main(["segment", "-o", str(out), "--model", str(tiny_model_manifest), "-q", "--no-preview"]) == EXIT_OK
    assert "running on a synthetic chest phantom generated by code instead" in capsys.readouterr().err
    record = json.loads((out / "synthetic-chest.measurements.json").read_text(encoding="utf-8"))
    assert "synthetic chest phantom" in record["source"]
    assert sitk.ReadImage(str(out / "synthetic-chest.labels.nii.gz")).GetSize() == (256, 256, 80)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_unavailable_cuda_is_a_usage_error(tmp_path, scans, tiny_model_manifest, capsys):
    code = main(["segment", str(scans / "alpha.nii.gz"), "-o", str(tmp_path / "o"), "--model",
                 str(tiny_model_manifest), "--device", "cuda"])
    assert code == EXIT_USAGE
    assert "CUDA is not available" in capsys.readouterr().err


def test_precision_is_recorded_and_an_unsupported_one_is_a_usage_error(tmp_path, scans, tiny_model_manifest, capsys):
    out = tmp_path / "fp32"
    assert main(["segment", str(scans / "alpha.nii.gz"), "-o", str(out), "--model", str(tiny_model_manifest),
                 "--device", "cpu", "--precision", "fp32", "-q"]) == EXIT_OK
    assert json.loads((out / "alpha.measurements.json").read_text(encoding="utf-8"))["precision"] == "fp32"
    code = main(["segment", str(scans / "alpha.nii.gz"), "-o", str(tmp_path / "fp16"), "--model",
                 str(tiny_model_manifest), "--device", "cpu", "--precision", "fp16"])
    assert code == EXIT_USAGE
    assert "--precision: precision 'fp16' is for CUDA only" in capsys.readouterr().err
    assert not (tmp_path / "fp16" / "alpha.labels.nii.gz").exists()


def test_flip_tta_is_recorded(tmp_path, scans, tiny_model_manifest):
    for flag, expected in (([], False), (["--flip-tta"], True)):
        out = tmp_path / str(expected)
        assert main(["segment", str(scans / "alpha.nii.gz"), "-o", str(out), "--model", str(tiny_model_manifest),
                     "--device", "cpu", "-q", "--no-preview", *flag]) == EXIT_OK
        assert json.loads((out / "alpha.measurements.json").read_text(encoding="utf-8"))["flip_tta"] is expected


@pytest.mark.parametrize("flag, key, default", [("--flip-tta", "flip_tta", False),
                                                 ("--no-nodule-check", "nodule_check", True)])
def test_batch_redoes_scans_made_with_the_other_setting(tmp_path, scans, tiny_model_manifest, flag, key, default):
    """A setting the JSON records: a batch with the other value segments the scan again and says why."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(scans / "alpha.nii.gz", folder / "alpha.nii.gz")
    out = tmp_path / "batch"
    args = ["batch", str(folder), "-o", str(out), "--model", str(tiny_model_manifest), "-q", "--no-preview"]

    def recorded():
        return json.loads((out / "alpha" / "alpha.measurements.json").read_text(encoding="utf-8"))[key]

    assert main(args) == EXIT_OK
    assert recorded() is default
    assert main([*args, flag]) == EXIT_OK
    row = read_summary(out / "summary.csv")["alpha"]
    assert (row["status"], row["note"]) == ("ok", f"segmented: previous outputs were made without {flag}")
    assert recorded() is not default
    assert main([*args, flag]) == EXIT_OK
    assert read_summary(out / "summary.csv")["alpha"]["status"] == "skipped"
    assert main(args) == EXIT_OK
    assert read_summary(out / "summary.csv")["alpha"]["note"] == f"segmented: previous outputs were made with {flag}"
