"""The whole training pipeline on a tiny synthetic record, through the command line:
download (local server) -> prepare -> cross-validate 2 folds (train + evaluate) -> export ->
the runtime engine loads the package and labels a volume."""

from __future__ import annotations

import csv
import json
import locale
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from CovidInfectionSegLib.model_package import load_model_package
from covidseg_training import download
from covidseg_training.__main__ import main as cli
from covidseg_training.data import SliceDataset
from covidseg_training.export import AT_LAST_EPOCH_NOTES

TINY_CONFIG = {
    "name": "tiny", "n_folds": 2, "fold": 0, "seed": 0, "input_size": 64, "base_channels": 4, "depth": 2,
    "epochs": 25, "batch_size": 4, "learning_rate": 0.01, "warmup_epochs": 1, "patience": 30, "threads": 1,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def pipeline(record_archives, tmp_path_factory) -> dict[str, Path]:
    """Run every stage once (the tests below check what each one left)."""
    from synthetic_zenodo import FileServer, record_listing

    root = tmp_path_factory.mktemp("pipeline")
    server = FileServer({**{name: path.read_bytes() for name, path in record_archives.items()},
                         "api/records/3757476": record_listing(record_archives)})
    try:
        files = download.checked_zenodo_files(server.url, f"{server.url}/api/records/3757476", log=lambda _: None)
        download.download_dataset(root / "zenodo", files, log=lambda _: None)
    finally:
        server.close()
    data = root / "data.npz"
    assert cli(["prepare", "--zenodo", str(root / "zenodo"), "--out", str(data), "--input-size", "64"]) == 0
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "data": str(data), "output_dir": str(root / "runs")}))
    assert cli(["crossval", str(config)]) == 0
    models = root / "models"
    fold0 = root / "runs" / "tiny" / "fold0"
    assert cli(["export", "--checkpoint", str(fold0 / "best.pt"), "--out", str(models), "--name", "tiny_unet",
                "--version", "0.1.0", "--metrics", str(fold0 / "eval" / "summary.json"),
                "--crossval", str(root / "runs" / "tiny" / "crossval" / "summary.json")]) == 0
    return {"root": root, "data": data, "config": config, "runs": root / "runs" / "tiny", "models": models}


def test_prepared_data(pipeline):
    dataset = SliceDataset.load(pipeline["data"])
    assert dataset.images.shape == (28, 64, 64)
    assert len(set(dataset.cases.tolist())) == 4
    # 64 px of 1.5 mm resized to 64 px: the surface metrics below get 1.5 mm, not the PNG export's guess
    np.testing.assert_allclose(dataset.pixel_mm, 1.5)


def test_every_fold_trained_and_evaluated(pipeline):
    for fold in (0, 1):
        folder = pipeline["runs"] / f"fold{fold}"
        history = json.loads((folder / "history.json").read_text(encoding="utf-8"))
        assert [row["epoch"] for row in history] == list(range(1, 26))
        summary = json.loads((folder / "eval" / "summary.json").read_text(encoding="utf-8"))
        assert summary["fold"] == fold and summary["n_cases"] == 2 and summary["n_slices"] == 14
        assert summary["assumptions"]["pixel_mm"] is None, "the prepared volumes carry their own pixel size"
        assert "1.500-1.500 mm" in summary["assumptions"]["pixel_note"]
        assert summary["assumptions"]["surface_tolerance_mm"]["lung"] == 1.0
        for structure in ("lung", "infection"):
            for metric in ("dice", "iou", "precision", "recall", "nsd"):
                assert 0.0 <= summary["per_case"][structure][metric]["mean"] <= 1.0
            assert summary["per_case"][structure]["hd95"]["mean"] >= 0.0
        assert summary["per_case"]["lung"]["dice"]["mean"] > 0.8, "25 epochs learn the dark synthetic lungs"
        assert set(summary["robustness"]) == {"as_is", "degraded", "note"}
        for name in ("per_slice.csv", "per_case.csv", "threshold_sweep.csv", "pr_curve.csv", "boxplot.png",
                     "pr_curve.png", "threshold_sweep.png", "examples.png", "robustness.json"):
            assert (folder / "eval" / name).stat().st_size > 0, name
        with (folder / "eval" / "per_slice.csv").open() as handle:
            assert len(list(csv.DictReader(handle))) == 14


def test_crossval_aggregate(pipeline):
    aggregate = json.loads((pipeline["runs"] / "crossval" / "summary.json").read_text(encoding="utf-8"))
    assert aggregate["folds"] == [0, 1]
    assert aggregate["over_folds"]["lung_dice"]["n"] == 2 and aggregate["over_cases"]["lung_dice"]["n"] == 4
    folds = [aggregate["per_fold"][k]["infection_dice"] for k in ("0", "1")]
    assert aggregate["over_folds"]["infection_dice"]["mean"] == pytest.approx(np.mean(folds))
    assert set(aggregate["healthy_lung_called_infection"]["per_fold"]) == {"0", "1"}
    with (pipeline["runs"] / "crossval" / "summary.csv").open() as handle:
        table = {(row["scope"], row["metric"]): row for row in csv.DictReader(handle)}
    assert {scope for scope, _ in table} == {"fold 0", "fold 1", "over folds", "over cases"}
    over_folds = table[("over folds", "infection_dice")]
    assert float(over_folds["mean"]) == pytest.approx(aggregate["over_folds"]["infection_dice"]["mean"], abs=1e-5)
    assert float(table[("fold 1", "lung_dice")]["mean"]) == pytest.approx(aggregate["per_fold"]["1"]["lung_dice"], abs=1e-5)
    assert int(table[("over cases", "lung_hd95")]["n"]) == 4


def test_crossval_puts_each_folds_last_epoch_beside_the_epoch_picked_on_its_own_cases(pipeline):
    from covidseg_training.checkpoint import load_checkpoint

    selection = json.loads((pipeline["runs"] / "crossval" / "summary.json").read_text(encoding="utf-8"))["epoch_selection"]
    for fold in (0, 1):
        folder = pipeline["runs"] / f"fold{fold}"
        history = json.loads((folder / "history.json").read_text(encoding="utf-8"))
        row = selection["per_fold"][str(fold)]
        kept = load_checkpoint(folder / "best.pt").record  # what eval/ measured
        assert row["selected_epoch"] == kept["epoch"] and row["infection_dice_selected"] == kept["infection_dice"]
        assert row["evaluated_epoch"] == kept["epoch"]  # eval/'s summary says which epoch it measured
        assert row["last_epoch"] == 25 and row["infection_dice_last"] == history[-1]["infection_dice"]
        assert row["lung_dice_last"] == history[-1]["lung_dice"]
        # the kept epoch has the best validation score of all, the last one included
        assert row["lung_dice_selected"] + row["infection_dice_selected"] >= row["lung_dice_last"] + row["infection_dice_last"]
    assert selection["over_folds"]["infection_dice_last"]["mean"] == pytest.approx(
        np.mean([selection["per_fold"][k]["infection_dice_last"] for k in ("0", "1")]))
    rows = selection["per_fold"].values()
    assert selection["evaluated_at"] == ("last" if all(r["selected_epoch"] == r["last_epoch"] for r in rows)
                                         else "selected")


def test_epoch_selection_reads_copied_tables_and_needs_every_folds_history(tmp_path):
    from covidseg_training.crossval import epoch_selection

    def fold_folder(name, history):  # tables copied without the run, as in training/results/
        folder = tmp_path / name
        folder.mkdir()
        if history is not None:
            (folder / "history.json").write_text(json.dumps(history), encoding="utf-8")
        return folder

    scores = [(0.90, 0.50), (0.95, 0.70), (0.96, 0.69), (0.97, 0.60)]  # epochs 2 and 3 tie at 1.65
    history = [{"epoch": i + 1, "loss": 1.0, "lung_dice": lung, "infection_dice": infection}
               for i, (lung, infection) in enumerate(scores)]
    selection = epoch_selection({0: fold_folder("a", history), 1: fold_folder("b", history[:2])})
    assert selection["per_fold"]["0"] == {"selected_epoch": 2, "last_epoch": 4, "evaluated_epoch": None,
                                          "lung_dice_selected": 0.95, "infection_dice_selected": 0.70,
                                          "lung_dice_last": 0.97, "infection_dice_last": 0.60}
    assert selection["evaluated_at"] == "unknown" and "do not all say" in selection["note"]
    assert selection["per_fold"]["1"]["selected_epoch"] == selection["per_fold"]["1"]["last_epoch"] == 2
    assert selection["over_folds"]["infection_dice_last"]["mean"] == pytest.approx(0.65)
    assert selection["over_folds"]["infection_dice_selected"]["mean"] == pytest.approx(0.70)
    assert epoch_selection({0: fold_folder("c", history), 1: fold_folder("d", None)}) is None
    no_validation = [{"epoch": 1, "loss": 1.0}]  # an all-data run's history
    assert epoch_selection({0: fold_folder("e", no_validation)}) is None


def test_epoch_selection_says_which_epoch_the_folds_evaluations_measured(tmp_path):
    from covidseg_training.crossval import epoch_selection

    history = [{"epoch": i + 1, "loss": 1.0, "lung_dice": 0.9, "infection_dice": score}
               for i, score in enumerate((0.5, 0.7, 0.6))]  # epoch 2 selected, epoch 3 last

    def folds(*evaluated):
        dirs = {}
        for fold, epoch in enumerate(evaluated):
            folder = tmp_path / f"{'_'.join(map(str, evaluated))}_{fold}"
            folder.mkdir()
            (folder / "history.json").write_text(json.dumps(history), encoding="utf-8")
            (folder / "summary.json").write_text(json.dumps({"evaluated_epoch": epoch}), encoding="utf-8")
            dirs[fold] = folder
        return epoch_selection(dirs)

    at_last = folds(3, 3)
    assert at_last["evaluated_at"] == "last" and at_last["per_fold"]["1"]["evaluated_epoch"] == 3
    assert "no held-out case chose the evaluated epochs" in at_last["note"]
    at_selected = folds(2, 2)
    assert at_selected["evaluated_at"] == "selected" and "optimistic" in at_selected["note"]
    assert folds(2, 3)["evaluated_at"] == "unknown"


def test_crossval_resumes_without_retraining(pipeline, capsys):
    best = pipeline["runs"] / "fold0" / "best.pt"
    before = best.stat().st_mtime_ns
    assert cli(["crossval", str(pipeline["config"])]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 2
    assert best.stat().st_mtime_ns == before


def test_package_evaluates_like_its_checkpoint(pipeline):
    out = pipeline["root"] / "eval_package"
    assert cli(["evaluate", "--checkpoint", str(pipeline["models"] / "tiny_unet.json"), "--config",
                str(pipeline["config"]), "--out", str(out), "--no-robustness"]) == 0
    package_summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    checkpoint_summary = json.loads((pipeline["runs"] / "fold0" / "eval" / "summary.json").read_text(encoding="utf-8"))
    for structure in ("lung", "infection"):
        assert package_summary["per_case"][structure]["dice"]["mean"] == pytest.approx(
            checkpoint_summary["per_case"][structure]["dice"]["mean"], abs=1e-4)
    assert "robustness" not in package_summary


def test_evaluate_with_flip_tta_records_it(pipeline):
    out = pipeline["root"] / "eval_flip"
    assert cli(["evaluate", "--checkpoint", str(pipeline["models"] / "tiny_unet.json"), "--config",
                str(pipeline["config"]), "--out", str(out), "--no-robustness", "--flip-tta"]) == 0
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["flip_tta"] is True and summary["per_case"]["lung"]["dice"]["mean"] > 0.5


def test_exported_model_labels_a_volume_in_the_engine(pipeline):
    pipeline_module = pytest.importorskip("CovidInfectionSegLib.pipeline")
    package = load_model_package(pipeline["models"] / "tiny_unet.json")
    manifest = package.manifest
    assert manifest["metrics"]["fold"] == 0 and "per_case" in manifest["metrics"]
    assert manifest["training_data"]["validation_cases"] and manifest["training_data"]["training_cases"]
    image = sitk.ReadImage(str(pipeline["root"] / "zenodo" / "COVID-19-CT-Seg_20cases" / "coronacases_001.nii.gz"))
    result = pipeline_module.segment_image(image, package, device="cpu")
    assert result.labelmap.GetSize() == image.GetSize()
    assert result.labelmap.GetSpacing() == image.GetSpacing()
    values = set(np.unique(sitk.GetArrayViewFromImage(result.labelmap)).tolist())
    assert values <= {0, 1, 2, 3} and {1, 2} <= values, f"right and left lung expected, got labels {values}"
    assert [segment.value for segment in result.segments] == [1, 2, 3]


def test_manifest_carries_the_cross_validation_that_covidseg_info_shows(pipeline):
    from CovidInfectionSegLib.cli import describe_model

    package = load_model_package(pipeline["models"] / "tiny_unet.json")
    block = package.manifest["cross_validation"]
    aggregate = json.loads((pipeline["runs"] / "crossval" / "summary.json").read_text(encoding="utf-8"))
    assert block["folds"] == [0, 1]
    assert block["mean_of_fold_means"]["infection_dice"]["mean"] == aggregate["over_folds"]["infection_dice"]["mean"]
    assert set(block["healthy_lung_called_infection"]) == {"as_is", "degraded"}
    last = aggregate["epoch_selection"]["over_folds"]["infection_dice_last"]
    assert block["at_last_epoch"]["infection_dice"] == {"mean": last["mean"], "sd": last["sd"]}
    assert block["at_last_epoch"]["note"] == AT_LAST_EPOCH_NOTES[aggregate["epoch_selection"]["evaluated_at"]]
    text = "\n".join(describe_model(package))
    assert "cross-validation (2 folds, mean over folds)" in text
    assert f"lung_dice {aggregate['over_folds']['lung_dice']['mean']:.3f}" in text
    assert "at each fold's last epoch: lung_dice " in text and f"infection_dice {last['mean']:.3f}" in text


def test_export_refuses_a_file_that_is_not_a_crossval_summary(pipeline, tmp_path, capsys):
    assert cli(["export", "--checkpoint", str(pipeline["runs"] / "fold0" / "best.pt"), "--out", str(tmp_path),
                "--name", "x", "--version", "0.0.1",
                "--crossval", str(pipeline["runs"] / "fold0" / "eval" / "summary.json")]) == 2
    assert re.search("^export: .*no 'over_folds' figures", capsys.readouterr().err, re.MULTILINE)
    assert not list(tmp_path.iterdir()), "nothing written"


def test_export_refuses_metrics_of_another_checkpoint(pipeline, tmp_path, capsys):
    fold1_summary = pipeline["runs"] / "fold1" / "eval" / "summary.json"
    assert json.loads(fold1_summary.read_text(encoding="utf-8"))["evaluated_sha256"]
    assert cli(["export", "--checkpoint", str(pipeline["runs"] / "fold0" / "best.pt"), "--out", str(tmp_path),
                "--name", "x", "--version", "0.0.1", "--metrics", str(fold1_summary)]) == 2
    assert re.search("^export: .*the metrics were computed on .*fold1.*not on .*fold0", capsys.readouterr().err,
                     re.MULTILINE)
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("start", ["tiny_unet.pt", "best.pt"])
def test_a_run_starts_from_exported_or_checkpoint_weights(pipeline, tmp_path, start):
    import torch

    weights = pipeline["models"] / start if start.endswith("unet.pt") else pipeline["runs"] / "fold0" / start
    expected = torch.jit.load(str(pipeline["models"] / "tiny_unet.pt"), map_location="cpu").state_dict()
    config = tmp_path / "finetune.yaml"
    # learning rate 0: one epoch leaves the starting weights exactly as they were (batch-norm running
    # statistics still follow the data, so they are not compared)
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": "finetune", "data": str(pipeline["data"]),
                                      "output_dir": str(tmp_path), "epochs": 1, "learning_rate": 0.0,
                                      "init_from": str(weights)}))
    assert cli(["train", str(config)]) == 0
    trained = torch.load(tmp_path / "finetune" / "fold0" / "best.pt", weights_only=False)["model"]
    assert trained.keys() == expected.keys()
    learned = [name for name in expected if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(learned) > 10
    for name in learned:
        torch.testing.assert_close(trained[name], expected[name], rtol=0, atol=0, msg=name)


def test_init_from_weights_of_another_architecture_is_refused(pipeline, tmp_path):
    config = tmp_path / "wide.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": "wide", "base_channels": 8, "data": str(pipeline["data"]),
                                      "output_dir": str(tmp_path), "epochs": 1,
                                      "init_from": str(pipeline["models"] / "tiny_unet.pt")}))
    with pytest.raises(ValueError, match=r"init_from: .*tiny_unet.pt: weights do not fit a UNet2D\(in_channels=1, base_channels=8"):
        cli(["train", str(config)])


def test_a_run_stopped_early_goes_on_under_a_larger_patience_only(pipeline, tmp_path, capsys):
    def train(patience: int) -> list[dict]:
        config = tmp_path / f"patience{patience}.yaml"
        config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": "stopper", "data": str(pipeline["data"]),
                                          "output_dir": str(tmp_path), "epochs": 3, "patience": patience,
                                          "max_train_slices": 8}))
        assert cli(["train", str(config)]) == 0
        return json.loads((tmp_path / "stopper" / "fold0" / "history.json").read_text())

    assert len(train(patience=0)) == 1, "a patience of 0 stops after the first epoch"
    assert len(train(patience=0)) == 1, "rerun under the same patience: already finished, not trained further"
    assert "already finished" in capsys.readouterr().out
    assert [record["epoch"] for record in train(patience=30)] == [1, 2, 3]
    assert "a patience of 30 lets it go on" in capsys.readouterr().out


def test_keep_from_epoch_keeps_each_later_epoch_as_a_checkpoint_that_exports(pipeline, tmp_path):
    import torch

    from covidseg_training.checkpoint import load_checkpoint

    config = tmp_path / "keep.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": "keep", "data": str(pipeline["data"]),
                                      "output_dir": str(tmp_path), "epochs": 3, "keep_from_epoch": 2,
                                      "max_train_slices": 8}))
    assert cli(["train", str(config)]) == 0
    run = tmp_path / "keep" / "fold0"
    assert sorted(path.name for path in run.glob("epoch*.pt")) == ["epoch02.pt", "epoch03.pt"]
    assert load_checkpoint(run / "epoch02.pt").record["epoch"] == 2
    last = torch.load(run / "last.pt", weights_only=False)["model"]
    kept = torch.load(run / "epoch03.pt", weights_only=False)["model"]
    for name in last:
        torch.testing.assert_close(kept[name], last[name], rtol=0, atol=0, msg=name)
    assert cli(["export", "--checkpoint", str(run / "epoch02.pt"), "--out", str(tmp_path / "models"),
                "--name", "keep_epoch02", "--version", "0.1.0-epoch2"]) == 0
    assert (tmp_path / "models" / "keep_epoch02.json").exists()


@pytest.fixture
def utf8_ctype():
    """torch 2.13 reads its kernel templates with the locale's encoding when torch._inductor is first
    imported. A library that an earlier test of the same pytest process loads leaves LC_CTYPE at "C"
    (ASCII), where that import fails; ``train --compile`` in a process of its own is not affected."""
    saved = locale.setlocale(locale.LC_CTYPE)
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:
        pytest.skip("no C.UTF-8 locale on this machine for torch.compile's templates")
    yield
    locale.setlocale(locale.LC_CTYPE, saved)


def test_a_compiled_training_step_trains_the_same_network(pipeline, tmp_path, utf8_ctype):
    """``compile: true`` runs the training step through torch.compile (really compiled here, with the
    machine's C++ compiler): the same losses as the plain step to float32 rounding, and a best.pt that
    loads and exports like any other (no ``_orig_mod.`` prefixes in it)."""
    import torch

    from covidseg_training.checkpoint import load_checkpoint

    runs = {}
    for compiled in (False, True):
        config = tmp_path / f"compiled{compiled}.yaml"
        config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": f"compiled{compiled}", "data": str(pipeline["data"]),
                                          "output_dir": str(tmp_path), "epochs": 2, "max_train_slices": 8,
                                          "compile": compiled}))
        assert cli(["train", str(config)]) == 0
        runs[compiled] = tmp_path / f"compiled{compiled}" / "fold0"
    plain, compiled = (json.loads((runs[flag] / "history.json").read_text()) for flag in (False, True))
    assert [record["loss"] for record in compiled] == pytest.approx([record["loss"] for record in plain], rel=1e-3)
    # The weights are not compared: AdamW moves a weight by about the learning rate whatever the size of its
    # gradient, so rounding in near-zero gradients shows up as 0.01 there (the step itself: the test below).
    plain_keys = torch.load(runs[False] / "best.pt", weights_only=False)["model"].keys()
    assert torch.load(runs[True] / "best.pt", weights_only=False)["model"].keys() == plain_keys
    assert load_checkpoint(runs[True] / "best.pt").config.compile is True
    assert cli(["export", "--checkpoint", str(runs[True] / "best.pt"), "--out", str(tmp_path / "models"),
                "--name", "compiled", "--version", "0.1.0"]) == 0


def test_compile_without_a_cpp_compiler_says_so_before_training(pipeline, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    config = tmp_path / "compiled.yaml"
    config.write_text(yaml.safe_dump({**TINY_CONFIG, "name": "nocxx", "data": str(pipeline["data"]),
                                      "output_dir": str(tmp_path), "epochs": 1, "max_train_slices": 8}))
    with pytest.raises(RuntimeError, match=r"compile: true needs a C\+\+ compiler .* set compile: false"):
        cli(["train", str(config), "--compile"])
    assert not (tmp_path / "nocxx" / "fold0" / "last.pt").exists()


@pytest.mark.parametrize("deep_supervision", [0, 1])
def test_the_compiled_forward_gives_the_plain_logits_and_gradients(deep_supervision, utf8_ctype):
    import torch

    from covidseg_training.config import TrainConfig
    from covidseg_training.losses import deep_supervision_loss
    from covidseg_training.train import training_forward
    from covidseg_training.unet import UNet2D

    torch.manual_seed(0)
    images, labels = torch.rand(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32))
    results = {}
    for compiled in (False, True):
        torch.manual_seed(1)
        model = UNet2D(base_channels=4, depth=2, auxiliary_heads=deep_supervision).train()
        config = TrainConfig(base_channels=4, depth=2, deep_supervision=deep_supervision, compile=compiled)
        outputs = training_forward(model, config, torch.device("cpu"))(images)
        deep_supervision_loss(outputs, labels, 1.0, 0.0).backward()
        results[compiled] = ([output.detach() for output in outputs],
                             {name: parameter.grad for name, parameter in model.named_parameters()})
    assert len(results[True][0]) == 1 + deep_supervision
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-4, atol=1e-5)
    assert results[True][1].keys() == results[False][1].keys()
    for name, gradient in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], gradient, rtol=1e-3, atol=1e-5, msg=name)
