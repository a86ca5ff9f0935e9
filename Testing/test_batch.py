"""batch.py on real files: discovery that never takes our own outputs, input fingerprints, resume
decisions, the folder lock, summary.csv, and one scan's outputs all or nothing. A second caller
segments without segment_file (as the Slicer batch script does through MRML) to show the split."""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path

import pytest
import SimpleITK as sitk
from phantoms import chest_phantom

from CovidInfectionSegLib.batch import (
    LESION_COLUMNS,
    OWNER_FILE,
    SUMMARY_FILE,
    FolderLockedError,
    Scan,
    SummaryError,
    SummaryWriter,
    decide,
    discover,
    expected_outputs,
    lesion_columns,
    input_changed,
    input_fingerprint,
    lock_output_folder,
    run_local_batch,
    run_scan,
    scan_stem,
    segment_and_write_files,
)
from CovidInfectionSegLib.imageio import read_image
from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.outputs import (
    write_measurement_files,
    write_segmentation_nrrd,
)
from CovidInfectionSegLib.pipeline import segment_image


@pytest.fixture(scope="module")
def model(tiny_model_manifest):
    return load_model_package(tiny_model_manifest)


def write_scan(path: Path, seed_shape=(12, 48, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(chest_phantom(shape=seed_shape).image(), str(path))
    return path


def engine_writer(model, preview: bool = True):
    """What ``covidseg batch`` does for one scan (without progress and cancel)."""
    return functools.partial(segment_and_write_files, model=model, preview=preview, device="cpu")


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["scan"]: row for row in csv.DictReader(handle)}


# ------------------------------------------------------------------------------------------- discovery


def test_discovery_never_returns_our_outputs(tmp_path, model):
    scans = tmp_path / "scans"
    write_scan(scans / "a.nii.gz")
    write_scan(scans / "sub" / "b.nrrd")
    out, earlier = scans / "results", scans / "old-results"  # this run's and an earlier run's, inside the input
    for folder in (earlier, out):
        folder.mkdir()
        run_local_batch(discover(scans, exclude=folder).scans, folder, engine_writer(model), outputs=expected_outputs())
    (scans / "loose").mkdir()
    for name in ("c.seg.nrrd", "c.labels.nii.gz"):  # outputs of a `covidseg segment` run
        (scans / "loose" / name).write_bytes((out / "a" / f"a{name[1:]}").read_bytes())
    (scans / ".d.covidseg-1-0000000a.partial").mkdir()
    write_scan(scans / ".d.covidseg-1-0000000a.partial" / "d.nii.gz")  # a staging folder

    found = discover(scans, exclude=out)
    assert [scan.name for scan in found.scans] == ["a", "sub/b"]
    assert sorted(path.name for path in found.ignored_outputs) == ["c.labels.nii.gz", "c.seg.nrrd", "old-results"]


def test_inputs_whose_stems_differ_only_in_case_keep_their_full_file_names(tmp_path):
    """Scan1 and scan1 would share one output folder on macOS and Windows, whose file systems ignore case."""
    scans = tmp_path / "scans"
    for name in ("Scan1.nii.gz", "scan1.nrrd", "a.nii.gz", "a.nrrd", "b.nii.gz"):
        write_scan(scans / name)
    assert sorted(scan.name for scan in discover(scans).scans) == ["Scan1.nii.gz", "a.nii.gz", "a.nrrd", "b", "scan1.nrrd"]


def test_a_root_folder_has_an_output_name():
    """A root has no name (a DICOM CD read at E:\\ on Windows; / here): outputs named ".seg.nrrd" would be hidden."""
    assert scan_stem("/") == "scan"


# --------------------------------------------------------------------------------------- fingerprints


def test_fingerprint_tells_changed_content_from_a_touch(tmp_path):
    path = write_scan(tmp_path / "a.nii.gz")
    recorded = input_fingerprint(path)
    assert input_changed(recorded, path) is None
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))  # touched or copied: times differ, content same
    assert input_changed(recorded, path) is None
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    assert input_changed(recorded, path) == "same size, different content"
    write_scan(path, seed_shape=(14, 48, 48))
    assert "bytes; was" in input_changed(recorded, path)


def test_fingerprint_of_a_dicom_folder_covers_every_file(tmp_path):
    from test_input_integrity import write_dicom_series

    paths = write_dicom_series(tmp_path / "series", [2.0 * k for k in range(9)])
    recorded = input_fingerprint(tmp_path / "series")
    assert recorded["files"] == 9 and input_changed(recorded, tmp_path / "series") is None
    paths[4].unlink()
    assert input_changed(recorded, tmp_path / "series").startswith("8 files")


# ------------------------------------------------------------------------------------------ decisions


def test_resume_decisions(tmp_path, model):
    scan = Scan(write_scan(tmp_path / "in" / "a.nii.gz"), "a")
    out = tmp_path / "out"
    out.mkdir()
    outputs = expected_outputs()
    identity = {"name": model.name, "version": model.version}
    assert decide(scan, out, outputs, model=identity).reason == "new"
    row = run_scan(scan, out, engine_writer(model), outputs)
    assert row["status"] == "ok"

    decision = decide(scan, out, outputs, model=identity)
    assert not decision.redo and decision.row["status"] == "skipped"
    assert decision.row["total_lung_ml"] == row["total_lung_ml"]
    for column in LESION_COLUMNS:  # the skipped row's largest lesion comes from the measurements.json
        assert decision.row[column] == row[column] != ""
    assert decide(scan, out, outputs, overwrite=True, model=identity).reason == "--overwrite"
    assert "made by model" in decide(scan, out, outputs, model={"name": "other", "version": "9"}).reason
    assert decide(scan, out, outputs, model=identity, flip_tta=True).reason == (
        "previous outputs were made without --flip-tta")
    assert decide(scan, out, outputs, model=identity, nodule_check=False).reason == (
        "previous outputs were made without --no-nodule-check")
    record_path = out / "a" / "a.measurements.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    assert record["nodule_check"] is True
    del record["nodule_check"]  # outputs of a version that did not record it: made with the check, the default
    record_path.write_text(json.dumps(record), encoding="utf-8")
    assert not decide(scan, out, outputs, model=identity).redo
    assert decide(scan, out, outputs, model=identity, nodule_check=False).redo

    write_scan(scan.path, seed_shape=(13, 48, 48))  # replaced by another scan
    assert decide(scan, out, outputs).reason.startswith("input changed since the previous run")

    record_path = out / "a" / "a.measurements.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    del record["input_fingerprint"]  # outputs of a version that recorded no fingerprint
    record_path.write_text(json.dumps(record), encoding="utf-8")
    assert "older version" in decide(scan, out, outputs).reason

    (out / "a" / "a.preview.png").unlink()
    assert decide(scan, out, outputs).reason == "previous outputs incomplete"
    assert decide(scan, out, expected_outputs(preview=False)).reason != "previous outputs incomplete"


def test_lesion_columns_zero_without_infection_and_empty_for_older_records():
    assert lesion_columns({"ml": 52.8, "share": 0.76, "extent_mm": 70.0, "side": "left"}) == {
        "largest_lesion_ml": 52.8, "largest_lesion_across_mm": 70.0}
    assert lesion_columns(None) == {"largest_lesion_ml": 0.0, "largest_lesion_across_mm": 0.0}
    assert lesion_columns("") == {"largest_lesion_ml": "", "largest_lesion_across_mm": ""}


def test_a_failed_scan_keeps_its_previous_outputs(tmp_path, model):
    scan = Scan(write_scan(tmp_path / "in" / "a.nii.gz"), "a")
    out = tmp_path / "out"
    out.mkdir()
    run_scan(scan, out, engine_writer(model), expected_outputs())
    before = {p.name: p.read_bytes() for p in (out / "a").iterdir() if not p.name.startswith(".")}
    scan.path.write_bytes(scan.path.read_bytes()[: scan.path.stat().st_size // 2])  # now truncated
    row = run_scan(scan, out, engine_writer(model), expected_outputs())
    assert row["status"] == "failed" and "truncated" in row["error"]
    assert {p.name: p.read_bytes() for p in (out / "a").iterdir() if not p.name.startswith(".")} == before


# -------------------------------------------------------------------------------------- lock, summary


def test_a_locked_folder_is_refused_and_says_who_holds_it(tmp_path):
    with lock_output_folder(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / OWNER_FILE).read_text(encoding="utf-8")
        with pytest.raises(FolderLockedError, match=rf"in use by another covidseg batch \(pid {os.getpid()} on"):
            with lock_output_folder(tmp_path):
                pass
    with lock_output_folder(tmp_path):  # released: usable again
        pass


def test_summary_that_cannot_be_written_is_a_clear_error_before_any_work(tmp_path):
    (tmp_path / SUMMARY_FILE).mkdir()
    with pytest.raises(SummaryError, match=r"cannot write the batch summary .*summary.csv: it is a folder"):
        SummaryWriter(tmp_path / SUMMARY_FILE)


def test_summary_rows_follow_the_scan_order_and_are_throttled(tmp_path):
    path = tmp_path / SUMMARY_FILE
    (tmp_path / ".summary.csv.x1y2.part.csv").write_text("left by a killed run", encoding="utf-8")
    summary = SummaryWriter(path, ["a", "b", "c"], interval_s=3600)
    assert not (tmp_path / ".summary.csv.x1y2.part.csv").exists()
    summary.add({"scan": "c", "status": "ok"})  # the first row is written at once
    summary.add({"scan": "a", "status": "failed", "error": "x"})  # within the interval: kept for later
    assert list(read_summary(path)) == ["c"]
    summary.close()
    assert list(read_summary(path)) == ["a", "c"]
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_FILE]


def test_a_summary_held_open_elsewhere_does_not_stop_the_batch_until_its_end(tmp_path, monkeypatch):
    """Windows refuses to replace a file that Excel has open; emulated here for summary.csv (CI has no Windows)."""
    from CovidInfectionSegLib import atomic

    path = tmp_path / SUMMARY_FILE
    held_open = {"summary": True}
    real_replace = atomic.os.replace

    def replace(source, destination):
        if Path(destination) == path and held_open["summary"]:
            raise PermissionError(13, "Permission denied")
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", replace)
    summary = SummaryWriter(path, ["a", "b"], interval_s=0)
    summary.add({"scan": "a", "status": "ok"})  # cannot replace it: deferred, the batch goes on
    assert not path.exists()
    held_open["summary"] = False
    summary.add({"scan": "b", "status": "ok"})
    assert list(read_summary(path)) == ["a", "b"]
    held_open["summary"] = True
    with pytest.raises(SummaryError, match=r"Permission denied \(is it open in another program, such as a spreadsheet\?\)"):
        summary.close()  # the last write must not be lost silently
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUMMARY_FILE], "no temporary file left"


# ------------------------------------------------------------------------------ another segmenter


def test_a_caller_that_segments_its_own_way_uses_the_same_batch(tmp_path, model):
    """Like the Slicer batch script: its own reading and segmentation, a .seg.nrrd and the measurements."""
    scans = tmp_path / "scans"
    write_scan(scans / "a.nii.gz")
    write_scan(scans / "b.mha")
    outputs = ["segmentation", "measurements_csv", "measurements_json"]

    def slicer_like(scan: Scan, folder: Path, fingerprint: dict):
        result = segment_image(read_image(scan.path), model, device="cpu")
        result.input_fingerprint = fingerprint
        write_segmentation_nrrd(result.labelmap, result.segments, folder / f"{scan.stem}.seg.nrrd")
        write_measurement_files(result, folder, scan.stem)
        return result

    out = tmp_path / "out"
    out.mkdir()
    rows = run_local_batch(discover(scans).scans, out, slicer_like, outputs=outputs)
    assert [row["status"] for row in rows] == ["ok", "ok"]
    again = run_local_batch(discover(scans).scans, out, slicer_like, outputs=outputs)
    assert [row["status"] for row in again] == ["skipped", "skipped"]
    assert sorted(p.name for p in (out / "a").iterdir() if not p.name.startswith(".")) == [
        "a.measurements.csv", "a.measurements.json", "a.seg.nrrd"]
    assert read_summary(out / SUMMARY_FILE)["b"]["status"] == "skipped"
