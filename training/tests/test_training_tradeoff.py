"""``tradeoff``: models side by side from their wholescan.csv and train_fit summaries."""

from __future__ import annotations

import csv
import json

import pytest

from covidseg_training.figures import tradeoff_figure
from covidseg_training.tradeoff import healthy_mean, main as tradeoff_main, nodule_mean, read_model

COLUMNS = ("scan", "infection_ml", "largest_infection_component_ml", "nodule_infection_percent")


def write_results(folder, infection, fits=()):
    """A results folder as wholescan and evaluate leave it: ``infection`` maps scan -> mL."""
    folder.mkdir(parents=True)
    with (folder / "wholescan.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        for scan, ml in infection.items():
            nodules = f"{ml / 2:.1f}" if scan.startswith("LIDC") else ""
            writer.writerow({"scan": scan, "infection_ml": ml, "largest_infection_component_ml": ml * 0.9,
                             "nodule_infection_percent": nodules})
    for fold, dice in enumerate(fits):
        (folder / f"train_fit/fold{fold}").mkdir(parents=True)
        summary = {"per_case": {"infection": {"dice": {"mean": dice}}}}
        (folder / f"train_fit/fold{fold}/summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


SCANS = ("covid-chest-ct", "example-chest-ct-kernel-L", "example-chest-ct-kernel-B", "LIDC-IDRI-0003", "LIDC-IDRI-0001")


def test_table_and_figure_from_two_models(tmp_path):
    write_results(tmp_path / "a", dict(zip(SCANS, (330.0, 56.0, 72.0, 20.0, 10.0))), fits=(0.8, 0.82))
    write_results(tmp_path / "b", dict(zip(SCANS, (280.0, 40.0, 60.0, 16.0, 6.0))))
    out, figure = tmp_path / "tradeoff.md", tmp_path / "tradeoff.png"
    assert tradeoff_main(["--model", f"control={tmp_path / 'a'}", "--model", f"strict={tmp_path / 'b'}",
                          "--curve", "control,strict", "--out", str(out), "--figure", str(figure)]) == 0
    rows = out.read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("Command: `python -m covidseg_training tradeoff --model control=")
    rows = rows[2:]
    assert rows[2] == "| control | 0.810 (2 folds) | 56.0 / 72.0 | 50.4 / 64.8 | 330.0 (297.0) | 10.0% / 5.0% |"
    assert rows[3] == "| strict | - | 40.0 / 60.0 | 36.0 / 54.0 | 280.0 (252.0) | 8.0% / 3.0% |"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert healthy_mean(read_model("b", tmp_path / "b")) == 50.0


def test_a_missing_scan_is_a_dash_not_a_zero(tmp_path):
    write_results(tmp_path / "a", {"covid-chest-ct": 300.0, "example-chest-ct-kernel-L": 50.0})
    model = read_model("a", tmp_path / "a")
    assert healthy_mean(model) is None and model.value("example-chest-ct-kernel-B", "infection_ml") is None


def test_bad_arguments_are_named(tmp_path):
    write_results(tmp_path / "a", {"covid-chest-ct": 300.0})
    with pytest.raises(SystemExit, match="no wholescan.csv"):
        tradeoff_main(["--model", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit, match="LABEL=FOLDER"):
        tradeoff_main(["--model", str(tmp_path / "a"), "--out", str(tmp_path / "t.md")])
    with pytest.raises(SystemExit, match="not given with --model: other"):
        tradeoff_main(["--model", f"a={tmp_path / 'a'}", "--curve", "a,other", "--out", str(tmp_path / "t.md")])
    assert not (tmp_path / "t.md").exists()


def test_epochs_of_runs_as_csv_files_in_groups(tmp_path):
    """The swing of single checkpoints: committed wholescan CSVs as models, each run's epochs a group; a
    fold model checked on one LIDC scan has that scan's nodules as its mean; the fit panel, which no
    model has, is left out of the figure."""
    one_lidc = ("covid-chest-ct", "example-chest-ct-kernel-L", "example-chest-ct-kernel-B", "LIDC-IDRI-0003")
    for run, epoch, values in (("a", 18, (370.0, 55.0, 86.0, 38.0)), ("a", 19, (490.0, 76.0, 87.0, 49.0)),
                               ("b", 26, (360.0, 40.0, 60.0, 30.0))):
        write_results(tmp_path / f"{run}{epoch}", dict(zip(one_lidc, values)))
        (tmp_path / f"{run}{epoch}" / "wholescan.csv").rename(tmp_path / f"wholescan_{run}_epoch{epoch}.csv")
    model = read_model("a18", tmp_path / "wholescan_a_epoch18.csv")
    assert nodule_mean(model) == 19.0 and healthy_mean(model) == 70.5 and model.fit_infection is None
    out, figure = tmp_path / "swing.md", tmp_path / "swing.png"
    assert tradeoff_main(["--model", f"a18={tmp_path / 'wholescan_a_epoch18.csv'}",
                          "--model", f"a19={tmp_path / 'wholescan_a_epoch19.csv'}",
                          "--model", f"b26={tmp_path / 'wholescan_b_epoch26.csv'}",
                          "--group", "run a=a18,a19", "--group", "run b=b26",
                          "--out", str(out), "--figure", str(figure)]) == 0
    assert out.read_text(encoding="utf-8").splitlines()[-1] == "| b26 | - | 40.0 / 60.0 | 36.0 / 54.0 | 360.0 (324.0) | 15.0% / - |"
    from PIL import Image

    with Image.open(figure) as image:  # two panels, not three
        assert 1.7 < image.width / image.height < 2.8, image.size


def test_bad_groups_are_named(tmp_path):
    write_results(tmp_path / "a", {"covid-chest-ct": 300.0})
    base = ["--model", f"a={tmp_path / 'a'}", "--out", str(tmp_path / "t.md")]
    with pytest.raises(SystemExit, match="NAME=LABEL"):
        tradeoff_main(base + ["--group", "a"])
    with pytest.raises(SystemExit, match="'g' names models not given with --model: b"):
        tradeoff_main(base + ["--group", "g=a,b"])
    with pytest.raises(SystemExit, match="a already in group 'g'"):
        tradeoff_main(base + ["--group", "g=a", "--group", "h=a"])
    with pytest.raises(SystemExit, match="no file"):
        tradeoff_main(["--model", f"x={tmp_path / 'gone.csv'}", "--out", str(tmp_path / "t.md")])
    assert not (tmp_path / "t.md").exists()


def test_the_legend_lies_outside_every_panel():
    points = [{"label": f"e{epoch}", "covid_found": 200.0 + 10 * epoch, "healthy_mean": 40.0 - epoch,
               "nodule_mean": 30.0 + epoch, "fit": 0.70 + epoch / 100, "group": "arm" if epoch > 2 else None}
              for epoch in range(1, 6)]
    figure = tradeoff_figure(points, ["e1", "e2"], "control's line")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend = figure.legends[0].get_window_extent(renderer)
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["control's line", "arm"]
    assert len(figure.axes) == 3
    for axis in figure.axes:
        assert axis.get_legend() is None
        assert not legend.overlaps(axis.get_window_extent(renderer)), "the legend covers a panel"


def test_labels_of_neighbouring_points_do_not_cover_each_other():
    # five epochs a few mL apart, as a run's last epochs sit: their labels would be drawn on top of each other
    points = [{"label": f"late masses e{epoch}", "covid_found": 200.0 + 2 * (epoch % 3), "healthy_mean": 8.0 + epoch % 2,
               "nodule_mean": 44.0 + epoch % 2, "fit": None} for epoch in range(26, 31)]
    points.append({"label": "control e30", "covid_found": 260.0, "healthy_mean": 30.0, "nodule_mean": 69.0,
                   "fit": None})
    figure = tradeoff_figure(points, [], "")
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    for axis in figure.axes:
        boxes = [text.get_window_extent(renderer) for text in axis.texts]
        assert len(boxes) == len(points)
        overlapping = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        assert not overlapping, f"{len(overlapping)} pairs of labels overlap"
