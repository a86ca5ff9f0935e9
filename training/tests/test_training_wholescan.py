"""Whole-scan checks: the measurements on volumes with known answers, the table, and the command end
to end on a synthetic chest with a real (tiny) TorchScript model."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.inference import pick_precision
from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.pipeline import segment_file
from CovidInfectionSegLib.postprocessing import WITHOUT_ANATOMY_CHECKS, WITHOUT_NODULE_CHECK, PostprocessingSettings
from covidseg_training.__main__ import main as training_main
from covidseg_training.classical_lung import classical_lung_mask
from covidseg_training.infection_components import components_csv, infection_components, mask_components
from covidseg_training.lidc_nodules import nodule_mask, parse_nodule_xml
from covidseg_training.wholescan import (
    COVID, HEALTHY, LIDC, ScanSpec, Target, anatomy_checks_off, apply_targets, chosen_settings, kernel_agreement_lines,
    lung_outside_classical, measure_scan, preview_slice_indices, summary_lines, table_csv, table_markdown,
)
from engine_model_factory import model_factory
from whole_chest import SPACING_ZYX, chest_image, write_nodule_read


SPACING = (2.0, 1.0, 0.5)  # z, y, x mm: one voxel is 1 mm3
BOX = (slice(5, 15), slice(10, 30), slice(20, 40))


def reference_box() -> np.ndarray:
    classical = np.zeros((20, 40, 80), dtype=bool)
    classical[BOX] = True
    return classical


def test_model_lung_10_mm_outside_the_reference_counts_3_mm_does_not():
    classical = reference_box()
    labels = classical.astype(np.uint8)
    labels[5:15, 10:30, 45] = 2  # 6 columns right of the box's edge (x 39) at 0.5 mm: 3 mm
    labels[5:15, 10:30, 59] = 2  # 20 columns: 10 mm
    labels[16, 10:30, 20:40] = 1  # 2 slices above the box (top slice 14) at 2 mm: 4 mm
    labels[17, 10:30, 20:40] = 3  # 3 slices: 6 mm (infection is model lung too)
    row = measure_scan(labels, classical, SPACING)
    assert row["outside_classical_ml"] == pytest.approx((200 + 400) / 1000)
    assert row["classical_lung_ml"] == pytest.approx(4.0)
    assert row["classical_missed_ml"] == 0


def test_classical_lung_more_than_5_mm_from_the_model_is_missed():
    classical = reference_box()
    labels = classical.astype(np.uint8)
    labels[11:15] = 0  # the top 4 slices of the box: 2, 4, 6 and 8 mm from the model's lung
    row = measure_scan(labels, classical, SPACING)
    assert row["classical_missed_ml"] == pytest.approx(2 * 400 / 1000)
    assert row["outside_classical_ml"] == 0
    # The box's 10 slices in fifths of 2: the missed slices 13 and 14 are its top fifth.
    assert row["classical_missed_apex_ml"] == pytest.approx(2 * 400 / 1000)
    assert row["classical_missed_base_ml"] == 0
    labels = classical.astype(np.uint8)
    labels[5:9] = 0  # the bottom 4 slices: slices 5 and 6 are missed, the bottom fifth
    row = measure_scan(labels, classical, SPACING)
    assert (row["classical_missed_base_ml"], row["classical_missed_apex_ml"]) == (pytest.approx(0.8), 0)


def test_the_preview_shows_the_slice_where_most_lung_is_missed_and_says_where_it_sits():
    classical = np.zeros((60, 40, 40), dtype=bool)
    classical[5:55, 10:30, 10:30] = True
    labels = classical.astype(np.uint8)
    missed = np.zeros_like(classical)
    missed[52, 12:20, 12:20] = True  # the apex: not on the spread of 4 slices over 5-54
    missed[20, 12:14, 12:14] = True
    chosen = preview_slice_indices(labels, classical, missed, None, count=4)
    assert 52 in chosen and 20 not in chosen and chosen == sorted(chosen, reverse=True)
    assert 52 not in preview_slice_indices(labels, classical, np.zeros_like(classical), None, count=4)
    spec = ScanSpec("kernel", Path("k.nii.gz"), HEALTHY)
    line = summary_lines(_row("kernel", 1000.0, classical_missed_apex_ml=2.2, classical_missed_base_ml=0.4), spec)[1]
    assert line.endswith("classical missed >5 mm 3 mL (top fifth 2, bottom fifth 0)")
    assert summary_lines(_row("kernel", 1000.0), spec)[1].endswith("classical missed >5 mm 3 mL")


def test_without_classical_lung_all_model_lung_is_outside():
    labels = np.zeros((20, 40, 80), dtype=np.uint8)
    labels[3, 3, 3:8] = 1
    row = measure_scan(labels, np.zeros_like(labels, dtype=bool), SPACING)
    assert row["outside_classical_ml"] == pytest.approx(0.005)


def test_lowest_slices_and_nodule_share():
    labels = np.zeros((20, 40, 80), dtype=np.uint8)
    labels[0, :10, :10] = 1  # 100 voxels of lung in the lowest slice
    labels[2, :5, :10] = 3  # 50 voxels of infection in the third
    labels[3, :10, :10] = 1  # above the lowest 3
    nodules = np.zeros(labels.shape, dtype=bool)
    nodules[2, :10, :10] = True  # 100 nodule voxels, 50 of them called infection
    row = measure_scan(labels, reference_box(), SPACING, low_slices=3, nodules=nodules)
    assert row["low_slices_ml"] == pytest.approx(0.15)
    assert row["low_slices_infection_ml"] == pytest.approx(0.05)
    assert (row["nodule_voxels"], row["nodule_infection_voxels"], row["nodule_infection_percent"]) == (100, 50, 50.0)
    assert "low_slices_ml" not in measure_scan(labels, reference_box(), SPACING)


def test_targets_are_issue_10s_limits():
    assert [(t.metric, t.text()) for t in LIDC] == [
        ("infection_ml", "< 30"), ("outside_classical_ml", "< 20"), ("nodule_infection_percent", "<= 5")]
    assert [(t.metric, t.text()) for t in COVID] == [("infection_ml", ">= 200"), ("low_slices_ml", "< 5")]
    row = apply_targets({"infection_ml": 30.0, "outside_classical_ml": 19.9}, HEALTHY)
    assert (row["infection_ml_met"], row["outside_classical_ml_met"]) == ("no", "yes")
    assert Target("nodule_infection_percent", "<=", 5.0).met(5.0)
    assert "nodule_infection_percent_met" not in apply_targets({"nodule_infection_percent": float("nan")}, LIDC)


def _row(scan: str, lung_ml: float, **values) -> dict:
    row = {"scan": scan, "status": "ok", "model_name": "m", "model_version": "2.0.0", "right_lung_ml": lung_ml / 2,
           "left_lung_ml": lung_ml / 2, "lung_ml": lung_ml, "infection_ml": 12.0, "classical_lung_ml": lung_ml,
           "outside_classical_ml": 25.0, "classical_missed_ml": 3.0, "low_slices": "", **values}
    return apply_targets(row, HEALTHY)


def test_markdown_states_values_targets_and_verdicts():
    rows = [_row("example-chest-ct-kernel-L", 1000.0),
            _row("example-chest-ct-kernel-B", 1030.0, classical_missed_apex_ml=2.2, classical_missed_base_ml=0.4),
            {"scan": "broken", "status": "failed: no such file", "model_name": "m", "model_version": "2.0.0"}]
    text = table_markdown(rows, ["Command: `x`"])
    assert text.startswith("# Whole-scan checks: m 2.0.0\n")
    assert ("| example-chest-ct-kernel-L | m 2.0.0 | 500 / 500 / 1000 | 12.0 (< 30: pass) | 25.0 (< 20: **FAIL**) | 3 |"
            in text)
    assert "| 25.0 (< 20: **FAIL**) | 3 (2 / 0) |" in text  # kernel B: missed, of it in the top / bottom fifth
    assert "| broken | m 2.0.0 | failed: no such file |" in text
    assert "3.0% apart (of the smaller; target within 3%: pass)" in text
    assert "**FAIL**" in kernel_agreement_lines([_row("example-chest-ct-kernel-L", 1000.0),
                                                 _row("example-chest-ct-kernel-B", 1031.0)])[0]
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert parsed[0]["outside_classical_ml_met"] == "no" and parsed[2]["status"] == "failed: no such file"
    assert "Infection components" not in text  # no row has any


def test_markdown_lists_each_scans_largest_infection_components():
    component = {"rank": 1, "ml": 46.02, "first_slice": 42, "last_slice": 52, "median_hu": -380.0, "solid_percent": 28.0,
                 "ground_glass_percent": 49.0, "aerated_percent": 8.0, "largest_solid_ml": 11.9, "in_nodules_percent": ""}
    rows = [_row("example-chest-ct-kernel-L", 1000.0, components=[component]), _row("clean", 1000.0, components=[])]
    text = table_markdown(rows, [])
    assert "| example-chest-ct-kernel-L | 1 of 1 | 46.0 | 42-52 | -380 | 28 / 49 / 8 | 11.9 | - |" in text
    assert "| clean |" not in text.split("Infection components")[1]
    assert "outside the classical lung, in components" not in text  # no row has any


def test_markdown_lists_each_scans_largest_components_of_lung_outside_the_classical_lung():
    mass = {"rank": 1, "ml": 32.4, "first_slice": 39, "last_slice": 52, "median_hu": 19.0, "solid_percent": 99.0,
            "ground_glass_percent": 0.4, "aerated_percent": 0.0, "largest_solid_ml": 32.1, "in_nodules_percent": ""}
    small = [dict(mass, rank=rank, ml=0.5) for rank in range(2, 6)]
    rows = [_row("example-chest-ct-kernel-B", 1000.0, components=[], outside_components=[mass, *small])]
    part = table_markdown(rows, []).split("outside the classical lung, in components")[1]
    assert "| example-chest-ct-kernel-B | 1 of 5 | 32.4 | 39-52 | 19 | 99 / 0 / 0 | 32.1 |\n" in part
    assert "in nodules" not in part  # never measured for the lung outside
    assert "| 3 of 5 |" in part and "| 4 of 5 |" not in part  # the three largest


def test_outside_components_are_the_voxels_measure_scan_counts():
    classical = reference_box()
    labels = classical.astype(np.uint8)
    labels[5:15, 10:30, 59] = 2  # 10 mm right of the box: 200 voxels of 1 mm3
    outside = lung_outside_classical(labels, classical, SPACING)
    ct = np.where(labels > 0, -850.0, 30.0)
    (component,) = mask_components(outside, ct, SPACING)
    assert component["ml"] == pytest.approx(measure_scan(labels, classical, SPACING)["outside_classical_ml"])
    assert component["ml"] == pytest.approx(0.2) and component["aerated_percent"] == 100


# ------------------------------------------------------------------------------- end to end, synthetic


@pytest.fixture(scope="module")
def synthetic_scan(tmp_path_factory) -> dict:
    """The synthetic whole chest as a NIfTI file, a nodule XML outlining 7 x 7 pixels in its right
    lung, and two tiny real TorchScript packages."""
    folder = tmp_path_factory.mktemp("wholescan")
    sitk.WriteImage(chest_image(), str(folder / "chest.nii.gz"))
    write_nodule_read(folder / "chest.xml")
    return {"scan": folder / "chest.nii.gz", "xml": folder / "chest.xml",
            "model": model_factory.write_model_package(folder / "model"),
            "other_model": model_factory.write_model_package(folder / "other", name="other")}


def test_command_writes_table_and_previews(synthetic_scan, tmp_path):
    out = tmp_path / "out"
    scan = synthetic_scan["scan"]
    code = training_main([
        "wholescan", "--model", str(synthetic_scan["model"]), "--out", str(out), "--device", "cpu",
        "--scan", f"chest={scan}", "--scan", f"again={scan}", "--nodules", f"chest={synthetic_scan['xml']}",
        "--low-slices", "chest=5", "--model-for", f"again={synthetic_scan['other_model']}",
    ])
    assert code == 0
    rows = list(csv.DictReader((out / "wholescan.csv").open()))
    assert [(r["scan"], r["status"], r["model_name"], r["model_version"]) for r in rows] == [
        ("chest", "ok", "tiny", "0.0.1"), ("again", "ok", "other", "0.0.1")]
    chest = rows[0]
    assert (int(chest["nodule_voxels"]), int(chest["nodule_contours_unmatched"]), chest["low_slices"]) == (49, 0, "5")
    assert rows[1]["nodule_voxels"] == "" and rows[1]["low_slices"] == ""

    # The table holds what the engine gives users for this scan, measured against the classical mask.
    result = segment_file(scan, load_model_package(synthetic_scan["model"]), device="cpu")
    labels = sitk.GetArrayFromImage(to_canonical(result.labelmap))
    ct = sitk.GetArrayFromImage(to_canonical(read_image(scan))).astype(np.float32)
    expected = measure_scan(labels, classical_lung_mask(ct, SPACING_ZYX), SPACING_ZYX, low_slices=5)
    assert float(chest["lung_ml"]) == pytest.approx(result.measurements.total.lung_ml, abs=1e-3)
    assert float(chest["infection_ml"]) == pytest.approx(result.measurements.total.infection_ml, abs=1e-3)
    for key in ("outside_classical_ml", "classical_missed_ml", "classical_lung_ml", "low_slices_ml"):
        assert float(chest[key]) == pytest.approx(expected[key], abs=1e-3), key
    assert float(chest["classical_lung_ml"]) > 50  # the synthetic lungs were found

    markdown = (out / "wholescan.md").read_text()
    assert "python -m covidseg_training wholescan --model" in markdown and "Machine: " in markdown
    assert "| chest | tiny 0.0.1 |" in markdown and "| again | other 0.0.1 |" in markdown
    assert json.loads((out / "chest.json").read_text())["nodule_voxels"] == 49

    # Each scan's infection components, as infection_components finds them in the engine's result.
    other = segment_file(scan, load_model_package(synthetic_scan["other_model"]), device="cpu")
    other_labels = sitk.GetArrayFromImage(to_canonical(other.labelmap))
    for name, found in (("chest", labels), ("again", other_labels)):
        expected_rows = infection_components(found, ct, SPACING_ZYX,
                                             nodules=None if name == "again" else nodule_mask(
                                                 parse_nodule_xml(synthetic_scan["xml"]), result.input_image).mask)
        assert (out / f"{name}_infection_components.csv").read_text() == components_csv(expected_rows)
        row = next(r for r in rows if r["scan"] == name)
        assert int(row["infection_components"]) == len(expected_rows)
        classical = classical_lung_mask(ct, SPACING_ZYX)
        expected_outside = mask_components(lung_outside_classical(found, classical, SPACING_ZYX), ct, SPACING_ZYX)
        assert (out / f"{name}_outside_components.csv").read_text() == components_csv(expected_outside)
        assert float(row["largest_outside_component_ml"]) == pytest.approx(
            expected_outside[0]["ml"] if expected_outside else 0.0, abs=1e-3)
    for name in ("chest", "again"):
        picture = cv2.imread(str(out / f"{name}.png"))
        assert picture is not None and picture.shape[0] > 300 and picture.shape[1] >= 640


def wholescan_row(synthetic_scan, out: Path, option: str) -> dict[str, str]:
    """The table row of the synthetic chest, from `wholescan` with one more option."""
    assert training_main(["wholescan", "--model", str(synthetic_scan["model"]), "--out", str(out), "--device", "cpu",
                          "--scan", f"chest={synthetic_scan['scan']}", option]) == 0
    return next(csv.DictReader((out / "wholescan.csv").open()))


def test_flip_tta_is_passed_to_the_engine_and_recorded(synthetic_scan, tmp_path):
    row = wholescan_row(synthetic_scan, tmp_path / "out", "--flip-tta")
    result = segment_file(synthetic_scan["scan"], load_model_package(synthetic_scan["model"]), device="cpu",
                          flip_tta=True)
    assert row["flip_tta"] == "yes" and row["anatomy_checks"] == "yes" and float(row["network_s"]) > 0
    assert float(row["lung_ml"]) == pytest.approx(result.measurements.total.lung_ml, abs=1e-3)
    assert "--flip-tta" in (tmp_path / "out" / "wholescan.md").read_text()


def test_no_anatomy_checks_is_passed_to_the_engine_and_recorded(synthetic_scan, tmp_path):
    row = wholescan_row(synthetic_scan, tmp_path / "out", "--no-anatomy-checks")
    model = load_model_package(synthetic_scan["model"])
    result = segment_file(synthetic_scan["scan"], model, device="cpu", settings=WITHOUT_ANATOMY_CHECKS)
    default = segment_file(synthetic_scan["scan"], model, device="cpu")
    assert row["anatomy_checks"] == "no" and row["flip_tta"] == "no" and row["nodule_check"] == "yes"
    assert float(row["lung_ml"]) == pytest.approx(result.measurements.total.lung_ml, abs=1e-3)
    assert result.measurements.total.lung_ml > default.measurements.total.lung_ml + 1, "the stomach's gas stays lung"
    assert "Post-processing without its anatomy checks" in (tmp_path / "out" / "wholescan.md").read_text()


def test_no_nodule_check_is_passed_to_the_engine_and_recorded(synthetic_scan, tmp_path):
    row = wholescan_row(synthetic_scan, tmp_path / "out", "--no-nodule-check")
    result = segment_file(synthetic_scan["scan"], load_model_package(synthetic_scan["model"]), device="cpu",
                          settings=WITHOUT_NODULE_CHECK)
    assert row["nodule_check"] == "no" and row["anatomy_checks"] == "yes"
    assert float(row["infection_ml"]) == pytest.approx(result.measurements.total.infection_ml, abs=1e-3)
    assert "Post-processing without its nodule check" in (tmp_path / "out" / "wholescan.md").read_text()


def test_the_two_post_processing_options_combine():
    assert chosen_settings(False, False) is None
    assert chosen_settings(True, False) == WITHOUT_ANATOMY_CHECKS
    assert chosen_settings(False, True) == WITHOUT_NODULE_CHECK
    both = chosen_settings(True, True)
    assert both.max_nodule_ml == 0 and anatomy_checks_off(both)
    assert not anatomy_checks_off(WITHOUT_NODULE_CHECK) and not anatomy_checks_off(None)
    assert not anatomy_checks_off(PostprocessingSettings())


def test_precision_is_passed_to_the_engine_and_recorded(synthetic_scan, tmp_path):
    row = wholescan_row(synthetic_scan, tmp_path / "fp32", "--precision=fp32")
    result = segment_file(synthetic_scan["scan"], load_model_package(synthetic_scan["model"]), device="cpu",
                          precision="fp32")
    assert row["precision"] == "fp32" == result.precision
    assert float(row["lung_ml"]) == pytest.approx(result.measurements.total.lung_ml, abs=1e-3)
    assert "device cpu, precision fp32" in (tmp_path / "fp32" / "wholescan.md").read_text()
    # The default is the engine's: bf16 on a CPU with native bf16, fp32 elsewhere; the table says which.
    default = wholescan_row(synthetic_scan, tmp_path / "auto", "--preview-slices=1")
    assert default["precision"] == pick_precision("auto", torch.device("cpu"))
    assert f"precision {default['precision']}" in (tmp_path / "auto" / "wholescan.md").read_text()


def test_a_precision_the_device_cannot_run_is_refused_before_any_work(synthetic_scan, tmp_path, capsys):
    code = training_main(["wholescan", "--model", str(synthetic_scan["model"]), "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--precision", "fp16", "--scan", f"chest={synthetic_scan['scan']}"])
    assert code == 2
    assert capsys.readouterr().err.startswith("wholescan: --precision: precision 'fp16' is for CUDA only")
    assert not (tmp_path / "out").exists()


def test_a_scan_that_fails_is_a_row_and_the_exit_code(synthetic_scan, tmp_path):
    out = tmp_path / "out"
    code = training_main(["wholescan", "--model", str(synthetic_scan["model"]), "--out", str(out),
                          "--scan", f"missing={tmp_path / 'nothing.nii.gz'}",
                          "--scan", f"chest={synthetic_scan['scan']}"])
    assert code == 1
    rows = list(csv.DictReader((out / "wholescan.csv").open()))
    assert rows[0]["status"].startswith("failed: ") and "no such file" in rows[0]["status"]
    assert rows[1]["status"] == "ok"


def test_options_naming_no_scan_are_refused(synthetic_scan, tmp_path, capsys):
    # Exit 2, as for argparse's refusals; exit 1 stays "some scan failed" (the test above).
    out = tmp_path / "out"
    assert training_main(["wholescan", "--out", str(out), "--scan", f"chest={synthetic_scan['scan']}",
                          "--model-for", f"chset={synthetic_scan['model']}"]) == 2
    assert capsys.readouterr().err.startswith("wholescan: --model-for: no scan named chset")
    assert training_main(["wholescan", "--out", str(out), "--scan", f"chest={synthetic_scan['scan']}",
                          "--low-slices", "17"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as usage:  # argparse's own exit goes through as it is
        training_main(["wholescan"])
    assert usage.value.code == 2
