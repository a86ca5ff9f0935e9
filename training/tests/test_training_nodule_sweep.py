"""nodule_sweep: the nodule check at other thresholds from wholescan folders made without it. At the engine's own
thresholds it must give what the engine gives with the check on, on a synthetic chest with a small and a large
bright (solid) lesion."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk

from CovidInfectionSegLib.postprocessing import MAX_NODULE_ML, MIN_NODULE_SOLID_SHARE
from covidseg_training.__main__ import main as training_main
from covidseg_training.nodule_sweep import ball_ml, sweep_folder, sweep_scan
from engine_model_factory import model_factory
from whole_chest import ORIGIN_XYZ, SPACING_ZYX, whole_chest


def test_a_ball_of_30_mm_is_the_engines_largest_nodule():
    assert ball_ml(30.0) == pytest.approx(MAX_NODULE_ML)


def test_components_small_and_solid_enough_are_taken_out_with_their_nodule_voxels():
    scan = {"scan": "s", "model_name": "m", "model_version": "1", "infection_ml": "10.0", "nodule_ml": "4.0",
            "nodule_infection_percent": "50.0"}
    components = [{"ml": "2.0", "solid_percent": "30.0", "in_nodules_percent": "90.0"},   # a nodule: out
                  {"ml": "7.0", "solid_percent": "5.0", "in_nodules_percent": "0.0"},     # ground glass: stays
                  {"ml": "1.0", "solid_percent": "20.0", "in_nodules_percent": "20.0"}]   # under 25% solid: stays
    row = sweep_scan(scan, components, max_ml=14.1, min_solid_percent=25.0)
    assert row["infection_left_ml"] == pytest.approx(8.0)
    assert row["nodule_infection_left_percent"] == pytest.approx(100.0 * (2.0 - 1.8) / 4.0)
    assert sweep_scan(scan, components, max_ml=1.5, min_solid_percent=15.0)["infection_left_ml"] == pytest.approx(9.0)


@pytest.fixture(scope="module")
def chest_with_solid_lesions(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sweep")
    volume = whole_chest().volume
    z, y, x = np.ogrid[tuple(slice(0, size) for size in volume.shape)]
    small = ((z - 26) / 1.5) ** 2 + ((y - 62) / 4.0) ** 2 + ((x - 38) / 4.0) ** 2 <= 1  # right lung, under 1 mL
    large = ((z - 26) / 5.0) ** 2 + ((y - 62) / 12.0) ** 2 + ((x - 90) / 12.0) ** 2 <= 1  # left lung, about 17 mL
    volume[small | large] = 2000.0  # the threshold network calls near-maximum intensity infection
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(SPACING_ZYX[::-1])
    image.SetOrigin(ORIGIN_XYZ)
    sitk.WriteImage(image, str(folder / "chest.nii.gz"))
    # the engine tests' phantoms use this network too
    model = model_factory.write_model_package(folder / "model",
                                              model_factory.ThresholdNet(lung_below=0.3, infection_above=0.75),
                                              "lunginf")
    runs = {}
    for name, options in (("without", ["--no-nodule-check"]), ("with", [])):
        assert training_main(["wholescan", "--model", str(model), "--device", "cpu", "--out", str(folder / name),
                              "--scan", f"chest={folder / 'chest.nii.gz'}", *options]) == 0
        runs[name] = folder / name
    return runs


def test_at_the_engines_thresholds_the_sweep_gives_what_the_engine_gives(chest_with_solid_lesions):
    with_check = next(csv.DictReader((chest_with_solid_lesions["with"] / "wholescan.csv").open()))
    swept = sweep_folder(chest_with_solid_lesions["without"], [MAX_NODULE_ML], [100.0 * MIN_NODULE_SOLID_SHARE])
    assert len(swept) == 1
    assert swept[0]["infection_ml"] > float(with_check["infection_ml"]) + 0.3, "the small solid lesion was taken out"
    assert float(with_check["infection_ml"]) > MAX_NODULE_ML, "the large one stays infection"
    assert swept[0]["infection_left_ml"] == pytest.approx(float(with_check["infection_ml"]), abs=0.1)


def test_the_command_writes_its_tables_and_refuses_a_folder_made_with_the_check(chest_with_solid_lesions, tmp_path,
                                                                              capsys):
    assert training_main(["nodule_sweep", "--out", str(tmp_path), str(chest_with_solid_lesions["without"])]) == 0
    rows = list(csv.DictReader((tmp_path / "nodule_sweep.csv").open()))
    assert len(rows) == 15 and {row["scan"] for row in rows} == {"chest"}
    assert "| 14.1 | 25 |" in (tmp_path / "nodule_sweep.md").read_text()
    capsys.readouterr()
    assert training_main(["nodule_sweep", "--out", str(tmp_path / "again"), str(chest_with_solid_lesions["with"])]) == 2
    assert "post-processed with the nodule check" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
