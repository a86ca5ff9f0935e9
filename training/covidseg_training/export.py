"""Export a training checkpoint as a model package: TorchScript ``<name>.pt`` + ``<name>.json`` manifest.

    python -m covidseg_training export --checkpoint runs/v1/fold0/best.pt \\
        --out ../CovidInfectionSeg/Resources/Models --name covid_unet_v1 --version 1.0.0 [--metrics eval/summary.json]

``--infection-offset B`` lowers the infection logit by ``B`` (in the head's bias, so the package runs
unchanged in the engine): another operating point of the same network, for measuring how much of a
change between two models a mere shift of the infection threshold would give.

The scripted network is checked against the eager one (and the saved file reloaded and checked
again) before anything is written; both files are written under temporary names and renamed.

TorchScript writes each module's constants in the order of a Python set of their names, which follows
Python's string hashing: the archive's bytes (and the manifest's sha256) are the same from run to run only
with ``PYTHONHASHSEED=0`` (the weights and the outputs are the same either way).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from CovidInfectionSegLib.atomic import atomic_path, write_text_atomic
from CovidInfectionSegLib.checksums import sha256_of

from .checkpoint import Checkpoint, load_checkpoint
from .config import TrainConfig
from .data import INFECTION, patient_folds
from .manifest import MA2020_DATASET, build_manifest
from .negatives import LUNG_LABEL_MEANS, NEGATIVE_SCAN_SOURCES
from .train import SELECTION_METRICS

TOLERANCE = 1e-4  # max |scripted - eager| logit difference accepted (float32, same CPU kernels)


def script_model(model: torch.nn.Module, input_size: int, seed: int = 0, channels: int = 1) -> torch.jit.ScriptModule:
    """TorchScript of ``model`` (eval mode), verified to give the eager logits on a random batch."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but it is the package format
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    verify_same_output(model, scripted, input_size, seed, channels=channels)
    return scripted


def verify_same_output(
    reference: torch.nn.Module, candidate: torch.nn.Module, input_size: int, seed: int = 0, batch: int = 2,
    channels: int = 1,
) -> float:
    """Max absolute logit difference on a random batch; raises ``RuntimeError`` above :data:`TOLERANCE`."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand((batch, channels, input_size, input_size), generator=generator)
    with torch.inference_mode():
        expected = reference(inputs)
        actual = candidate(inputs)
    if actual.shape != expected.shape:
        raise RuntimeError(f"scripted output shape {tuple(actual.shape)} != eager {tuple(expected.shape)}")
    difference = float((actual - expected).abs().max())
    if difference > TOLERANCE:
        raise RuntimeError(f"scripted output differs from eager output by {difference:.3g} (> {TOLERANCE})")
    return difference


def architecture_of(model: torch.nn.Module, config: TrainConfig) -> dict[str, Any]:
    return {
        "type": "UNet2D",
        "base_channels": config.base_channels,
        "depth": config.depth,
        "in_channels": config.channels,
        "classes": 3,
        "parameters": int(sum(parameter.numel() for parameter in model.parameters())),
    }


def describe_training_data(config: TrainConfig, record: dict[str, Any]) -> dict[str, Any]:
    """Where the weights came from: dataset, form of the data, folds and cases used for training."""
    from .train import load_dataset  # late: reading the data is only needed here

    description: dict[str, Any] = {
        **MA2020_DATASET,
        "form": (
            "axial slices after the intensity recipe (256x256 PNG export of the Kaggle copy by "
            "dstaroff/COVID19-CT-Segmentation, or `prepare --zenodo` from the NIfTI volumes): middle 60% of "
            "each volume, only slices that contain infection"
        ),
        "data": config.data or "shared PNG export (ma2020-covid19-ct-png)",
        "n_folds": config.n_folds,
        "validation_fold": config.fold,
        "split_seed": config.seed,
        "epochs_trained": record.get("epoch"),
    }
    if config.negatives.per_epoch:
        scans = config.negatives.scans_for_fold(config.fold)
        description["negative_scans"] = {
            "scans": scans,
            "slices_per_epoch": config.negatives.per_epoch,
            "form": "whole CT scans without COVID-19 read from HU through the engine (every level), no infection "
                    "outside the classical HU lung mask",
            "lung_label": config.negatives.lung_label,
            "lung_label_means": LUNG_LABEL_MEANS[config.negatives.lung_label],
            "sources": {scan: NEGATIVE_SCAN_SOURCES[scan] for scan in scans if scan in NEGATIVE_SCAN_SOURCES},
        }
    try:
        dataset = load_dataset(config)
    except (FileNotFoundError, OSError, KeyError) as error:
        description["cases"] = f"unknown: training data not readable here ({error})"
        return description
    if config.fold is None:
        description.update(trained_folds="all", training_cases=sorted(set(dataset.cases.tolist())),
                           n_training_slices=int(len(dataset.cases)))
        return description
    folds = patient_folds(dataset.cases, config.n_folds, config.seed)
    train_mask = folds != config.fold
    description.update(
        trained_folds=[fold for fold in range(config.n_folds) if fold != config.fold],
        training_cases=sorted(set(dataset.cases[train_mask].tolist())),
        validation_cases=sorted(set(dataset.cases[~train_mask].tolist())),
        n_training_slices=int(train_mask.sum()),
        n_validation_slices=int((~train_mask).sum()),
    )
    return description


def read_metrics(path: Path | None) -> dict[str, Any]:
    """The ``summary.json`` written by ``evaluate`` (or any JSON object), for the manifest's ``metrics``."""
    if path is None:
        return {}
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read metrics JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"{path}: metrics JSON must be an object, got {type(metrics).__name__}")
    return metrics


AT_LAST_EPOCH_NOTES = {
    "last": "each fold's last epoch, from its training history (under the training's autocast); the figures "
            "above are of the same epochs, evaluated: every fold was taken at its last epoch, as the all-data "
            "model is",
    "selected": "each fold's last epoch, from its training history: the figures above are of the epoch with "
                "the best score on the fold's own validation cases (optimistic); the all-data model is its "
                "last epoch",
    "unknown": "each fold's last epoch, from its training history; which epoch the figures above measured is "
               "not recorded for every fold (if the best on the fold's own validation cases, they are "
               "optimistic); the all-data model is its last epoch",
}


def cross_validation_summary(crossval_summary: dict[str, Any], source: str = "") -> dict[str, Any]:
    """The manifest's ``cross_validation`` block from ``crossval``'s aggregate ``summary.json``: per
    metric the mean and sd of the fold means (what ``covidseg info`` shows), the same Dice at each fold's
    last epoch where the summary has it, and healthy lung called infection, as is and at 3 mm."""
    over_folds = crossval_summary.get("over_folds")
    if not isinstance(over_folds, dict) or not over_folds:
        raise ValueError(f"{source or 'crossval summary'}: no 'over_folds' figures (not a crossval summary.json?)")
    block: dict[str, Any] = {
        "folds": list(crossval_summary.get("folds", [])),
        "mean_of_fold_means": {metric: {"mean": stats["mean"], "sd": stats["sd"]}
                               for metric, stats in over_folds.items()},
        "note": "the recipe's patient-grouped cross-validation: each fold's per-case mean on its validation "
                "slices, then the mean and sd over folds",
    }
    selection = crossval_summary.get("epoch_selection")
    if isinstance(selection, dict) and isinstance(selection.get("over_folds"), dict):
        last = {metric: selection["over_folds"].get(f"{metric}_last") for metric in SELECTION_METRICS}
        block["at_last_epoch"] = {
            **{metric: {"mean": stats["mean"], "sd": stats["sd"]} for metric, stats in last.items() if isinstance(stats, dict)},
            "note": AT_LAST_EPOCH_NOTES.get(selection.get("evaluated_at"), AT_LAST_EPOCH_NOTES["unknown"]),
        }
    healthy = crossval_summary.get("healthy_lung_called_infection")
    if isinstance(healthy, dict):
        block["healthy_lung_called_infection"] = {name: {"mean": healthy[name]["mean"], "sd": healthy[name]["sd"]}
                                                  for name in ("as_is", "degraded") if name in healthy}
    if source:
        block["source"] = source
    return block


ALL_DATA_METRICS_NOTE = (
    "these weights were trained on every case, so they have no held-out score of their own; the figures "
    "are a held-out evaluation of the same training recipe with the evaluated cases left out (evaluated_file)"
)


def check_metrics_belong_to(metrics: dict[str, Any], checkpoint_path: Path) -> None:
    """Refuse an evaluation of another file (``best.pt`` is rewritten while training runs)."""
    evaluated = metrics.get("evaluated_sha256")
    if evaluated and evaluated != sha256_of(checkpoint_path):
        raise ValueError(
            f"the metrics were computed on {metrics.get('evaluated_file')} (sha256 {evaluated[:12]}), not on "
            f"{checkpoint_path} as it is now (sha256 {sha256_of(checkpoint_path)[:12]}): the checkpoint changed "
            "since the evaluation; copy best.pt to a fixed name, evaluate that copy and export it"
        )


def export_checkpoint(
    checkpoint: Checkpoint | str | Path,
    out_dir: str | Path,
    name: str,
    version: str,
    metrics: dict[str, Any] | None = None,
    training_data: dict[str, Any] | None = None,
    cross_validation: dict[str, Any] | None = None,
    infection_offset: float = 0.0,
) -> Path:
    """Write ``<out_dir>/<name>.pt`` (TorchScript) and ``<name>.json`` (manifest); returns the manifest path.
    ``infection_offset`` is subtracted from the infection logit (see the module's docstring)."""
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = load_checkpoint(checkpoint)
    metrics = dict(metrics or {})
    model = checkpoint.model
    if infection_offset:
        if metrics or cross_validation:
            raise ValueError("metrics describe the checkpoint as trained, not shifted by --infection-offset; "
                             "evaluate the exported package instead")
        model = with_infection_logit_lowered(model, infection_offset)
    if metrics and checkpoint.config.fold is None:
        # Trained on every case: nothing is left to evaluate it on, so it carries the held-out
        # evaluation of its recipe (another file by construction), labelled as such.
        metrics["estimate_of_recipe"] = ALL_DATA_METRICS_NOTE
    else:
        check_metrics_belong_to(metrics, checkpoint.path)
    config = checkpoint.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scripted = script_model(model, config.input_size, channels=config.channels)
    weights_path = out_dir / f"{name}.pt"
    save_scripted(scripted, weights_path, lambda saved: verify_same_output(
        model, saved, config.input_size, seed=1, channels=config.channels))
    recipe = config.recipe()
    manifest = build_manifest(
        weights_path,
        name=name,
        version=version,
        architecture=architecture_of(model, config),
        recipe=recipe,
        training_data=training_data if training_data is not None else describe_training_data(config, checkpoint.record),
        metrics={"training_record": checkpoint.record, **metrics},
        cross_validation=cross_validation,
    )
    if infection_offset:
        manifest["infection_logit_offset"] = {
            "value": infection_offset,
            "note": "subtracted from the trained network's infection logit (head bias) at export: the same weights "
                    "at a stricter (positive) or looser (negative) infection threshold",
        }
    manifest_path = out_dir / f"{name}.json"
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return manifest_path


def save_scripted(scripted: torch.jit.ScriptModule, path: Path, check: Callable[[torch.jit.ScriptModule], Any]) -> None:
    """Write ``scripted`` to ``path`` under a temporary name, load it back and ``check`` it, then rename: a
    ``check`` that raises leaves nothing at ``path``."""
    with atomic_path(path) as temporary, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer = io.BytesIO()  # not the temporary file: its random name would become the archive's inner folder
        torch.jit.save(scripted, buffer)
        temporary.write_bytes(buffer.getvalue())
        check(torch.jit.load(str(temporary)))


def with_infection_logit_lowered(model: torch.nn.Module, offset: float) -> torch.nn.Module:
    """A copy of ``model`` (a :class:`unet.UNet2D`) whose infection logit is ``offset`` lower everywhere;
    ``model`` itself is left as it is."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        shifted.head.bias[INFECTION] -= offset
    return shifted


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="best.pt written by train")
    parser.add_argument("--out", required=True, type=Path, help="folder for <name>.pt and <name>.json")
    parser.add_argument("--name", required=True, help="package name and file stem, e.g. covid_unet_v1")
    parser.add_argument("--version", required=True, help="model version, e.g. 1.0.0")
    parser.add_argument("--metrics", type=Path, help="summary.json from `evaluate`, stored as the manifest's metrics")
    parser.add_argument("--crossval", type=Path,
                        help="crossval/summary.json of the recipe: its mean of fold means becomes the manifest's "
                             "cross_validation block")
    parser.add_argument("--infection-offset", type=float, default=0.0,
                        help="subtract this from the infection logit (a stricter infection threshold when positive)")
    args = parser.parse_args(argv)
    if os.environ.get("PYTHONHASHSEED") != "0":
        print("note: without PYTHONHASHSEED=0 the TorchScript archive's bytes, and so its sha256, differ from run "
              "to run (the weights do not)", file=sys.stderr)
    try:
        cross_validation = None
        if args.crossval:
            cross_validation = cross_validation_summary(read_metrics(args.crossval), str(args.crossval))
        manifest_path = export_checkpoint(args.checkpoint, args.out, args.name, args.version,
                                          read_metrics(args.metrics), cross_validation=cross_validation,
                                          infection_offset=args.infection_offset)
    except (ValueError, FileNotFoundError) as error:
        print(f"export: {error}", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    print(f"wrote {manifest_path.parent / manifest['file']} ({manifest['architecture']['parameters']} parameters, "
          f"sha256 {manifest['sha256'][:12]}) and {manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
