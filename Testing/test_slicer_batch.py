"""The Slicer batch script (CovidInfectionSeg/Scripts/covidseg_slicer_batch.py) on a real MRML scene: results,
exit codes whatever is raised, and the batch module's guarantees (resume, folder lock, never its own
outputs, a kill -9 through atomic.pause_point that loses nothing) with real child processes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
slicerio = pytest.importorskip("slicerio")

from fault_injection import kill_9, leftovers, release, start_paused, visible  # noqa: E402
from model_factory import write_model_package  # noqa: E402
from phantoms import chest_phantom  # noqa: E402

from CovidInfectionSegLib.batch import input_fingerprint  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "CovidInfectionSeg" / "Scripts" / "covidseg_slicer_batch.py"
RAS_ORDERED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def load_script():
    spec = importlib.util.spec_from_file_location("covidseg_slicer_batch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def batch():
    return load_script()


@pytest.fixture
def scans(tmp_path) -> dict[str, sitk.Image]:
    """Two good scans (NIfTI in RAS voxel order, NRRD), a damaged NIfTI and a blank (constant) volume
    the engine refuses, in tmp_path/scans."""
    folder = tmp_path / "scans"
    folder.mkdir()
    phantom = chest_phantom(shape=(20, 112, 112), spacing=(0.8, 0.8, 2.5))
    images = {
        "alpha": phantom.image(direction=RAS_ORDERED, origin=(40.0, 60.0, -30.0)),
        "beta": phantom.image(origin=(-45.0, -45.0, 100.0)),
    }
    sitk.WriteImage(images["alpha"], str(folder / "alpha.nii.gz"))
    sitk.WriteImage(images["beta"], str(folder / "beta.nrrd"))
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI file at all")
    sitk.WriteImage(sitk.Image(48, 48, 12, sitk.sitkInt16) - 1000, str(folder / "blank.nrrd"))
    return images


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {row["scan"]: row for row in csv.DictReader(handle)}


def test_batch_segments_good_scans_records_the_bad_one_and_leaves_the_scene_empty(
    batch, scans, tmp_path, tiny_model_manifest, capsys
):
    scene = slicer.vtkMRMLScene()
    out = tmp_path / "results"
    argv = ["--", "--input", str(tmp_path / "scans"), "--output", str(out), "--model", str(tiny_model_manifest),
            "--device", "cpu"]

    code = batch.main(argv, scene=scene)

    assert code == 1  # some scans failed
    assert scene.GetNumberOfNodes() == 0
    summary = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in summary.items()} == {
        "alpha": "ok", "beta": "ok", "blank": "failed", "broken": "failed"}
    assert "broken.nii.gz" in summary["broken"]["error"]
    assert summary["blank"]["error"] == "volume 'blank': constant image (every voxel is -1000); nothing to segment"
    for name, image in scans.items():
        segmentation = slicerio.read_segmentation(str(out / name / f"{name}.seg.nrrd"))
        assert [s["name"] for s in segmentation["segments"]] == ["Right lung", "Left lung", "Infection"]
        assert [s["labelValue"] for s in segmentation["segments"]] == [1, 2, 3]
        voxels = segmentation["voxels"]
        assert voxels.shape == image.GetSize()
        # The written grid is the input's grid (same voxel-to-LPS mapping), so labels overlay the scan.
        np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(image), atol=1e-6)
        lung_ml = np.count_nonzero(np.isin(voxels, (1, 2))) * np.prod(image.GetSpacing()) / 1000
        assert lung_ml > 50  # both phantom lungs found (37 mL each)
        # The largest lesion comes back from the child's record, as the engine measured it there.
        record = json.loads((out / name / f"{name}.measurements.json").read_text(encoding="utf-8"))
        lesion = record["largest_infection_lesion"]
        expected = ("0.0", "0.0") if lesion is None else (str(lesion["ml"]), str(lesion["extent_mm"]))
        assert (summary[name]["largest_lesion_ml"], summary[name]["largest_lesion_across_mm"]) == expected
        assert float(summary[name]["total_lung_ml"]) == pytest.approx(lung_ml, abs=1e-3)
        with open(out / name / f"{name}.measurements.csv", newline="") as handle:
            rows = {row["region"]: row for row in csv.DictReader(handle)}
        assert float(rows["total"]["lung_ml"]) == pytest.approx(lung_ml, abs=1e-3)
        record = json.loads((out / name / f"{name}.measurements.json").read_text(encoding="utf-8"))
        assert record["source"].endswith(("alpha.nii.gz", "beta.nrrd"))
    assert "2 ok, 0 skipped, 2 failed" in capsys.readouterr().out


def test_batch_usage_and_model_errors_have_their_exit_codes(batch, scans, tmp_path, tiny_model_manifest):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert batch.main(["--input", str(empty), "--output", str(tmp_path / "o1"), "--model", str(tiny_model_manifest)]) == 2
    assert batch.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2
    assert batch.main(["--output", str(tmp_path / "o3")]) == 2  # --input is required
    bad_model = tmp_path / "model.json"
    bad_model.write_text("{not json")
    assert batch.main(["--input", str(tmp_path / "scans"), "--output", str(tmp_path / "o4"), "--model", str(bad_model)]) == 3


def test_script_runs_as_a_program_and_exits_with_its_code(scans, tmp_path, tiny_model_manifest):
    (tmp_path / "scans" / "broken.nii.gz").unlink()
    (tmp_path / "scans" / "blank.nrrd").unlink()
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(tmp_path / "scans"), "--output", str(out),
         "--model", str(tiny_model_manifest), "--device", "cpu", "--batch-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert {row["status"] for row in read_summary(out / "summary.csv").values()} == {"ok"}


# ------------------------------------------------------------------ exit codes whatever is raised


def shadow_packages(folder: Path, packages: dict[str, str]) -> dict[str, str]:
    """An environment whose PYTHONPATH puts ``packages`` (name -> __init__ source) first."""
    for name, source in packages.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(source)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


BROKEN_IMPORT = 'raise ImportError("simulated: a package this Slicer lacks")\n'
# Stands in for the Slicer application, which cannot run here: the real slicer-core package plus an
# ``app``, with slicer.util.exit (the only way to end Slicer started with --no-main-window) recording its code.
SLICER_APPLICATION = """
import os
__file__ = os.environ["REAL_SLICER_INIT"]
__path__[:] = [os.path.dirname(__file__)]
exec(compile(open(__file__).read(), __file__, "exec"))
import slicer.util
app = object()

def _record_exit(status=0):
    with open(os.environ["EXIT_CODE_FILE"], "w") as handle:
        handle.write(str(status))

slicer.util.exit = _record_exit
"""


def test_an_import_that_fails_still_ends_with_the_internal_error_code(scans, tmp_path):
    env = shadow_packages(tmp_path / "shadow", {"CovidInfectionSegSlicer": BROKEN_IMPORT})
    completed = subprocess.run([sys.executable, str(SCRIPT), "--input", str(tmp_path / "scans"), "--output",
                                str(tmp_path / "out")], capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 70
    assert "internal error: ImportError: simulated: a package this Slicer lacks" in completed.stderr
    assert "Traceback" in completed.stderr


@pytest.mark.parametrize(
    ("packages", "arguments", "code"),
    [
        ({}, ["--input", "{tmp}/missing", "--output", "{tmp}/out"], 2),
        ({"CovidInfectionSegSlicer": BROKEN_IMPORT}, ["--input", "{tmp}/scans", "--output", "{tmp}/out"], 70),
        ({}, ["--input", "{tmp}/scans", "--output", "{tmp}/out", "--model", "{tmp}/missing.json"], 3),
    ],
    ids=["bad-arguments", "import-fails", "model-missing"],
)
def test_inside_slicer_the_script_asks_slicer_to_exit_with_its_code(scans, tmp_path, packages, arguments, code):
    env = shadow_packages(tmp_path / "shadow", {"slicer": SLICER_APPLICATION, **packages})
    env["EXIT_CODE_FILE"] = str(tmp_path / "exit-code")
    env["REAL_SLICER_INIT"] = slicer.__file__
    bin_dir = tmp_path / "slicer-bin"  # Slicer puts PythonSlicer on PATH; this one is this Python
    bin_dir.mkdir()
    (bin_dir / "PythonSlicer").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "PythonSlicer").chmod(0o755)
    env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    argv = ["--", *(argument.format(tmp=tmp_path) for argument in arguments)]
    completed = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=300, env=env)
    assert (tmp_path / "exit-code").read_text() == str(code), completed.stderr


# ------------------------------------------------------------------- batch.py: resume, lock, kills


@pytest.fixture
def two_scans(tmp_path) -> Path:
    """tmp_path/scans with two small phantoms, alpha.nii.gz and beta.nrrd."""
    folder = tmp_path / "scans"
    folder.mkdir()
    sitk.WriteImage(chest_phantom(shape=(12, 48, 48)).image(), str(folder / "alpha.nii.gz"))
    sitk.WriteImage(chest_phantom(shape=(12, 48, 48)).image(origin=(-60.0, -60.0, 20.0)), str(folder / "beta.nrrd"))
    return folder


def replace_beta(scans: Path) -> sitk.Image:
    """Put another scan in beta's place (other size and grid): its outputs must be made again."""
    image = chest_phantom(shape=(14, 56, 56), spacing=(4.0, 4.0, 8.0)).image(origin=(10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(scans / "beta.nrrd"))
    return image


def batch_args(scans: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["--input", str(scans), "--output", str(out), "--model", str(model), "--device", "cpu", *extra]


def script(*args: str) -> list[str]:
    return [sys.executable, str(SCRIPT), *args]


def statuses(out: Path) -> dict[str, str]:
    return {name: row["status"] for name, row in read_summary(out / "summary.csv").items()}


def scan_files_of(files: dict[str, bytes], name: str) -> dict[str, bytes]:
    """The files of scan ``name`` in a :func:`visible` listing of an output folder."""
    return {path: data for path, data in files.items() if path.startswith(f"{name}/")}


def scan_files(out: Path, name: str) -> dict[str, bytes]:
    return scan_files_of(visible(out), name)


def test_resume_skips_completed_scans_and_redoes_a_changed_input(batch, two_scans, tmp_path, tiny_model_manifest,
                                                                 capsys):
    scene = slicer.vtkMRMLScene()
    out = tmp_path / "results"
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    assert statuses(out) == {"alpha": "ok", "beta": "ok"}
    first = visible(out)
    assert sorted(first) == ["alpha/alpha.measurements.csv", "alpha/alpha.measurements.json", "alpha/alpha.seg.nrrd",
                             "beta/beta.measurements.csv", "beta/beta.measurements.json", "beta/beta.seg.nrrd",
                             "summary.csv"]

    # Again: nothing is segmented, every output stays as it was, the summary keeps the numbers.
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"alpha": "skipped", "beta": "skipped"}
    assert rows["alpha"]["note"] == "outputs complete for this input (--overwrite redoes)"
    assert float(rows["beta"]["total_lung_ml"]) > 0
    assert {path: data for path, data in visible(out).items() if path != "summary.csv"} == {
        path: data for path, data in first.items() if path != "summary.csv"}
    assert "0 ok, 2 skipped, 0 failed" in capsys.readouterr().out

    # beta replaced by another scan, alpha only touched: beta is segmented again, alpha is not.
    os.utime(two_scans / "alpha.nii.gz", ns=(1, 1))
    new_beta = replace_beta(two_scans)
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"alpha": "skipped", "beta": "ok"}
    assert rows["beta"]["note"].startswith("segmented: input changed since the previous run")
    assert scan_files(out, "alpha") == scan_files_of(first, "alpha")
    segmentation = slicerio.read_segmentation(str(out / "beta" / "beta.seg.nrrd"))
    assert segmentation["voxels"].shape == new_beta.GetSize()
    np.testing.assert_allclose(segmentation["ijkToLPS"], ijk_to_lps(new_beta), atol=1e-6)
    record = json.loads((out / "beta" / "beta.measurements.json").read_text(encoding="utf-8"))
    assert record["source"] == str(two_scans / "beta.nrrd")
    assert record["input_fingerprint"] == input_fingerprint(two_scans / "beta.nrrd")

    # Another model: every scan again. --overwrite: every scan again, whatever is there.
    other_model = write_model_package(tmp_path / "other-model", name="other")
    assert batch.main(batch_args(two_scans, out, other_model), scene=scene) == 0
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"alpha": "ok", "beta": "ok"}
    assert rows["alpha"]["note"] == "segmented: previous outputs were made by model {'name': 'tiny', 'version': '0.0.1'}"
    assert batch.main(batch_args(two_scans, out, other_model, "--overwrite"), scene=scene) == 0
    assert statuses(out) == {"alpha": "ok", "beta": "ok"}
    assert read_summary(out / "summary.csv")["beta"]["note"] == "segmented: --overwrite"
    assert scene.GetNumberOfNodes() == 0
    assert leftovers(out) == []


@pytest.mark.parametrize("flag, key, default", [("--flip-tta", "flip_tta", False),
                                                 ("--no-nodule-check", "nodule_check", True)])
def test_a_setting_is_recorded_and_a_run_with_the_other_value_redoes_the_scans(batch, two_scans, tmp_path,
                                                                               tiny_model_manifest, flag, key, default):
    scene = slicer.vtkMRMLScene()
    out = tmp_path / "results"

    def recorded():
        return json.loads((out / "alpha" / "alpha.measurements.json").read_text(encoding="utf-8"))[key]

    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    assert recorded() is default
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest, flag), scene=scene) == 0
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"alpha": "ok", "beta": "ok"}
    assert rows["alpha"]["note"] == f"segmented: previous outputs were made without {flag}"
    assert recorded() is not default
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest, flag), scene=scene) == 0
    assert statuses(out) == {"alpha": "skipped", "beta": "skipped"}
    assert scene.GetNumberOfNodes() == 0


def test_a_second_run_on_a_locked_folder_exits_4(batch, two_scans, tmp_path, tiny_model_manifest, capsys):
    out = tmp_path / "results"
    # The first run holds the folder's lock, stopped before its first scan.
    first = start_paused(script(*batch_args(two_scans, out, tiny_model_manifest)), "scan", tmp_path / "paused")
    scene = slicer.vtkMRMLScene()
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 4
    err = capsys.readouterr().err
    assert f"is in use by another covidseg batch (pid {first.pid} on" in err
    assert not list(out.rglob("*.seg.nrrd")) and scene.GetNumberOfNodes() == 0  # the second run did nothing
    code, stdout, stderr = release(first, tmp_path / "paused")
    assert code == 0, stderr
    assert "2 ok, 0 skipped, 0 failed" in stdout
    assert statuses(out) == {"alpha": "ok", "beta": "ok"}
    # The lock went with the first process: the next run gets the folder.
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0


def test_the_script_never_takes_its_own_outputs_as_scans(batch, two_scans, tmp_path, tiny_model_manifest, capsys):
    scene = slicer.vtkMRMLScene()
    inside = two_scans / "results"  # the output folder inside the input folder
    assert batch.main(batch_args(two_scans, inside, tiny_model_manifest), scene=scene) == 0
    assert batch.main(batch_args(two_scans, inside, tiny_model_manifest), scene=scene) == 0
    assert statuses(inside) == {"alpha": "skipped", "beta": "skipped"}
    # A second output folder beside the first, and a loose copy of a result among the scans.
    (two_scans / "alpha-copy.seg.nrrd").write_bytes((inside / "alpha" / "alpha.seg.nrrd").read_bytes())
    capsys.readouterr()
    again = two_scans / "results-2"
    assert batch.main(batch_args(two_scans, again, tiny_model_manifest), scene=scene) == 0
    assert statuses(again) == {"alpha": "ok", "beta": "ok"}
    assert sorted(path.parent.name for path in again.rglob("*.seg.nrrd")) == ["alpha", "beta"]
    assert f"left out 2 covidseg outputs found under {two_scans}" in capsys.readouterr().out  # results/, the copy
    assert scene.GetNumberOfNodes() == 0


@pytest.mark.parametrize("point", ["staged:segmentation", "staged:measurements_json", "commit"])
def test_a_killed_run_keeps_the_previous_result_and_is_resumed(batch, two_scans, tmp_path, tiny_model_manifest, point):
    """kill -9 of the script while it writes beta's new result over the previous one, then the same run again."""
    scene = slicer.vtkMRMLScene()
    out = tmp_path / "results"
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    previous = visible(out)
    replace_beta(two_scans)

    # alpha is skipped, so beta is the first scan this run writes
    child = start_paused(script(*batch_args(two_scans, out, tiny_model_manifest)), point, tmp_path / "paused")
    kill_9(child)
    if point == "commit":  # killed while moving a complete result in: the next run finishes the move
        assert scan_files(out, "beta") != scan_files_of(previous, "beta")
        assert any(name.startswith("beta/") and name.endswith(".complete") for name in leftovers(out))
    else:
        assert scan_files(out, "beta") == scan_files_of(previous, "beta")  # byte for byte
        assert any(name.startswith("beta/") and name.endswith(".partial") for name in leftovers(out))
    assert scan_files(out, "alpha") == scan_files_of(previous, "alpha")

    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 0
    rows = read_summary(out / "summary.csv")
    # after a kill in the move, the complete new result is moved in and is up to date: nothing to redo
    assert {name: row["status"] for name, row in rows.items()} == {
        "alpha": "skipped", "beta": "skipped" if point == "commit" else "ok"}
    record = json.loads((out / "beta" / "beta.measurements.json").read_text(encoding="utf-8"))
    assert record["input_fingerprint"] == input_fingerprint(two_scans / "beta.nrrd")
    assert sorted(scan_files(out, "beta")) == sorted(scan_files_of(previous, "beta"))
    assert scan_files(out, "alpha") == scan_files_of(previous, "alpha")
    assert leftovers(out) == [] and scene.GetNumberOfNodes() == 0


def test_a_model_the_engine_refuses_stops_the_batch_with_code_3(batch, two_scans, tmp_path, tiny_model_manifest,
                                                                capsys):
    """The manifest reads, but the network file does not match its checksum: the child process refuses it at
    the first scan, and the batch stops instead of failing every scan the same way."""
    package = tmp_path / "damaged-model"
    package.mkdir()
    for path in tiny_model_manifest.parent.iterdir():
        (package / path.name).write_bytes(path.read_bytes())
    weights = package / json.loads(tiny_model_manifest.read_text())["file"]
    weights.write_bytes(weights.read_bytes() + b"\0")
    scene = slicer.vtkMRMLScene()
    out = tmp_path / "results"
    assert batch.main(batch_args(two_scans, out, package / tiny_model_manifest.name), scene=scene) == 3
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "stopped before segmenting any more scans" in err
    assert read_summary(out / "summary.csv") == {}  # written, and no scan in it
    assert not visible(out / "alpha") and leftovers(out) == []
    assert scene.GetNumberOfNodes() == 0


def test_a_summary_that_cannot_be_written_exits_4_before_any_scan(batch, two_scans, tmp_path, tiny_model_manifest,
                                                                 capsys):
    out = tmp_path / "results"
    (out / "summary.csv").mkdir(parents=True)  # a folder where the summary goes
    scene = slicer.vtkMRMLScene()
    assert batch.main(batch_args(two_scans, out, tiny_model_manifest), scene=scene) == 4
    err = capsys.readouterr().err
    assert f"cannot write the batch summary {out / 'summary.csv'}" in err and "Traceback" not in err
    assert not list(out.rglob("*.seg.nrrd")) and scene.GetNumberOfNodes() == 0
