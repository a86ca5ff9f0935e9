"""The Slicer batch script (CovidInfectionSeg/Scripts/covidseg_slicer_batch.py) on a real MRML scene."""

from __future__ import annotations

import csv
import importlib.util
import json
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
    """Two good scans (NIfTI in RAS voxel order, NRRD) and a damaged NIfTI, in tmp_path/scans."""
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
    assert {name: row["status"] for name, row in summary.items()} == {"alpha": "ok", "beta": "ok", "broken": "failed"}
    assert "broken.nii.gz" in summary["broken"]["error"]
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
    assert "2 ok, 1 failed" in capsys.readouterr().out


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
    out = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--input", str(tmp_path / "scans"), "--output", str(out),
         "--model", str(tiny_model_manifest), "--device", "cpu", "--batch-size", "8"],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert {row["status"] for row in read_summary(out / "summary.csv").values()} == {"ok"}
