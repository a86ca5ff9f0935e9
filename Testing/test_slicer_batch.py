"""The Slicer batch script (CovidInfectionSeg/Scripts/covidseg_slicer_batch.py) on a real MRML scene."""

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

from phantoms import chest_phantom  # noqa: E402

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
        assert float(summary[name]["total_lung_ml"]) == pytest.approx(lung_ml, abs=1e-3)
        with open(out / name / f"{name}.measurements.csv", newline="") as handle:
            rows = {row["region"]: row for row in csv.DictReader(handle)}
        assert float(rows["total"]["lung_ml"]) == pytest.approx(lung_ml, abs=1e-3)
        record = json.loads((out / name / f"{name}.measurements.json").read_text(encoding="utf-8"))
        assert record["source"].endswith(("alpha.nii.gz", "beta.nrrd"))
    assert "2 ok, 2 failed" in capsys.readouterr().out


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
