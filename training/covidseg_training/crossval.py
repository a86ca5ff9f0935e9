"""Patient-grouped k-fold cross-validation: train and evaluate every fold, then aggregate.

    python -m covidseg_training crossval configs/v1.yaml [--folds 0 1] [--epochs N] [--no-robustness]

Fold k trains on the other folds' patients (data.patient_folds, seeded by the config) and is
evaluated on its own into ``<output_dir>/<name>/fold<k>/eval/``. Resumable: a fold whose
``eval/summary.json`` exists is skipped, and an interrupted fold resumes training from its
``last.pt``. The aggregate goes to ``<output_dir>/<name>/crossval/``: per_case.csv (all folds),
folds.csv (per-fold means), summary.csv and summary.json (mean and sd per fold, over folds and over all
cases) and boxplot.png.

Each fold's evaluated checkpoint is the epoch with the best score on that fold's own validation cases, so
its evaluation is an optimistic estimate of the recipe. ``summary.json``'s ``epoch_selection`` puts beside
it the validation scores of each fold's last epoch (from its training history): the rule the all-data
model follows, which no held-out case chose.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from CovidInfectionSegLib.atomic import write_text_atomic

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .evaluate import METRICS, STRUCTURES, describe, evaluate, write_table
from .figures import plot_boxplot
from .model_and_data import DEFAULT_PIXEL_MM, evaluated_file, validation_set
from .train import SELECTION_METRICS, pick_device, run_dir, selection_score, train


def fold_config(config: TrainConfig, fold: int) -> TrainConfig:
    if not 0 <= fold < config.n_folds:
        raise ValueError(f"fold {fold} is outside 0..{config.n_folds - 1}")
    fold_copy = copy.deepcopy(config)
    fold_copy.fold = fold
    return fold_copy


def run_fold(config: TrainConfig, *, pixel_mm: float, robustness: bool, log: Callable[[str], None]) -> Path:
    """Train (or resume) and evaluate one fold; returns its evaluation folder. Skips a finished fold."""
    eval_dir = run_dir(config) / "eval"
    if (eval_dir / "summary.json").exists():
        log(f"fold {config.fold}: finished before ({eval_dir / 'summary.json'}), skipped")
        return eval_dir
    log(f"fold {config.fold}: training into {run_dir(config)}")
    fold_dir = train(config, log=log)
    checkpoint = load_checkpoint(fold_dir / "best.pt")
    meta = {"model": f"checkpoint {checkpoint.path}", **evaluated_file(checkpoint.path),
            "evaluated_epoch": checkpoint.epoch, "fold": config.fold, "n_folds": config.n_folds,
            "split_seed": config.seed, "data": config.data or "shared PNG export (ma2020-covid19-ct-png)"}
    # On the training device: on the GPU machine, five folds evaluated on the CPU's few threads per run (wider
    # network, robustness pass) were still running after as long as their 30 epochs had taken (2026-12-04).
    evaluate(checkpoint.model, validation_set(config), eval_dir, pixel_mm=pixel_mm, robustness=robustness, meta=meta,
             device=pick_device(config.device))
    return eval_dir


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [{k: (v if k == "case" else float(v)) for k, v in row.items()} for row in csv.DictReader(handle)]


def summary_rows(case_rows: list[dict[str, Any]], fold_rows: list[dict[str, Any]],
                 columns: list[str]) -> list[dict[str, Any]]:
    """Long table of mean, sd, median, min, max and n: over each fold's cases, over the fold means and
    over all cases."""
    scopes = [(f"fold {row['fold']}", [r for r in case_rows if r["fold"] == row["fold"]]) for row in fold_rows]
    scopes += [("over folds", fold_rows), ("over cases", case_rows)]
    return [{"scope": scope, "metric": column, **describe(row[column] for row in rows)}
            for scope, rows in scopes for column in columns]


def _history_of(eval_dir: Path) -> list[dict[str, Any]] | None:
    """A fold's training history: in the folder itself where the tables were copied (training/results/...),
    or beside its eval/ folder in a run."""
    for path in (eval_dir / "history.json", eval_dir.parent / "history.json"):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
    return None


def epoch_selection(eval_dirs: dict[int, Path]) -> dict[str, Any] | None:
    """Per fold, the validation Dice (lung, infection; per-case means, as training recorded them) of the
    epoch that ``best.pt`` kept and of the last epoch trained, and both over the folds; with the epoch the
    fold's eval/ measured where its summary says (``evaluate`` records it) and, over the folds, which of the
    two that was (:func:`evaluated_at`). None unless every fold has a history with validation scores."""
    per_fold = {}
    for fold, eval_dir in sorted(eval_dirs.items()):
        history = [record for record in _history_of(eval_dir) or [] if "infection_dice" in record]
        if not history:
            return None
        kept = [record for record in history if record.get("kept")]
        # histories written before training marked the kept epoch: its rule (the first of equal scores)
        selected = kept[-1] if kept else max(history, key=selection_score)
        summary_path = eval_dir / "summary.json"
        evaluated = json.loads(summary_path.read_text(encoding="utf-8")).get("evaluated_epoch") \
            if summary_path.is_file() else None
        per_fold[str(fold)] = {"selected_epoch": selected["epoch"], "last_epoch": history[-1]["epoch"],
                               "evaluated_epoch": evaluated,
                               **{f"{metric}_selected": selected[metric] for metric in SELECTION_METRICS},
                               **{f"{metric}_last": history[-1][metric] for metric in SELECTION_METRICS}}
    evaluated_at_epoch = evaluated_at(per_fold.values())
    return {
        "note": EPOCH_SELECTION_NOTES[evaluated_at_epoch],
        "evaluated_at": evaluated_at_epoch,
        "per_fold": per_fold,
        "over_folds": {f"{metric}_{which}": describe(row[f"{metric}_{which}"] for row in per_fold.values())
                       for which in ("selected", "last") for metric in SELECTION_METRICS},
    }


HISTORY_SCORES = "validation scores from each fold's training history (under the training's autocast); "
EPOCH_SELECTION_NOTES = {
    "last": HISTORY_SCORES + "every fold's eval/ measured its last epoch, the rule the all-data model follows, so no "
                             "held-out case chose the evaluated epochs; the selected epoch is what best.pt kept",
    "selected": HISTORY_SCORES + "every fold's eval/ measured the selected epoch (best.pt), picked on the same held-out "
                                 "cases, so its figures are optimistic; the last epoch is the rule the all-data model "
                                 "follows",
    "unknown": HISTORY_SCORES + "unless the run kept its last epoch (keep_epoch: last), the selected epoch (best.pt, "
                                "what the fold's eval/ measured) was picked on the same held-out cases, so its figures "
                                "are optimistic; the last epoch is the rule the all-data model follows; the folds' "
                                "eval/ summaries do not all say which epoch they measured",
}


def evaluated_at(folds: Any) -> str:
    """"last" when every fold's eval/ measured its last epoch, "selected" when every one measured the
    selected epoch (and not all the last), else "unknown" (older summaries without the epoch, or a mix)."""
    rows = list(folds)
    if rows and all(row["evaluated_epoch"] == row["last_epoch"] for row in rows):
        return "last"
    if rows and all(row["evaluated_epoch"] == row["selected_epoch"] for row in rows):
        return "selected"
    return "unknown"


def aggregate(eval_dirs: dict[int, Path], out_dir: Path) -> dict[str, Any]:
    """Combine the folds' per-case tables: per-fold means, mean and sd over folds, and over all cases."""
    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows, fold_rows, robustness = [], [], {}
    for fold, eval_dir in sorted(eval_dirs.items()):
        rows = _read_rows(eval_dir / "per_case.csv")
        all_rows += [{"fold": fold, **row} for row in rows]
        fold_rows.append({"fold": fold, "cases": len(rows),
                          **{f"{s}_{m}": float(np.mean([r[f"{s}_{m}"] for r in rows])) for s in STRUCTURES for m in METRICS}})
        summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
        if "robustness" in summary:
            robustness[fold] = {name: summary["robustness"][name]["pooled"] for name in ("as_is", "degraded")}
    columns = [f"{s}_{m}" for s in STRUCTURES for m in METRICS]
    result: dict[str, Any] = {
        "folds": [row["fold"] for row in fold_rows],
        "per_fold": {str(row["fold"]): {c: row[c] for c in columns} for row in fold_rows},
        "over_folds": {c: describe(row[c] for row in fold_rows) for c in columns},
        "over_cases": {c: describe(row[c] for row in all_rows) for c in columns},
        "note": "per-case metrics on 2D validation slices (middle 60%, slices with infection); see each fold's eval/",
    }
    if robustness:
        result["healthy_lung_called_infection"] = {
            "per_fold": {str(k): v for k, v in robustness.items()},
            **{name: describe(v[name] for v in robustness.values()) for name in ("as_is", "degraded")},
        }
    selection = epoch_selection(eval_dirs)
    if selection:
        result["epoch_selection"] = selection
    write_table(out_dir / "per_case.csv", all_rows)
    write_table(out_dir / "folds.csv", fold_rows)
    write_table(out_dir / "summary.csv", summary_rows(all_rows, fold_rows, columns))
    plot_boxplot([("per case, all folds", all_rows), ("per fold (means)", fold_rows)], out_dir / "boxplot.png")
    write_text_atomic(out_dir / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def print_summary(result: dict[str, Any]) -> None:
    """The headline of an aggregate: mean ± sd over the folds, and the last-epoch pair where histories were found."""
    for column in ("lung_dice", "infection_dice", "infection_nsd"):
        stats = result["over_folds"][column]
        print(f"{column}: {stats['mean']:.3f} ± {stats['sd']:.3f} over {stats['n']} folds")
    if "epoch_selection" in result:
        last = result["epoch_selection"]["over_folds"]
        print(f"at each fold's last epoch (no held-out case chose it): lung_dice {last['lung_dice_last']['mean']:.3f}, "
              f"infection_dice {last['infection_dice_last']['mean']:.3f} (training history)")


def crossval(config: TrainConfig, folds: list[int] | None = None, *, pixel_mm: float = DEFAULT_PIXEL_MM,
             robustness: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every fold in ``folds`` (default all) and aggregate; returns the aggregate summary."""
    folds = list(range(config.n_folds)) if folds is None else folds
    eval_dirs = {fold: run_fold(fold_config(config, fold), pixel_mm=pixel_mm, robustness=robustness, log=log)
                 for fold in folds}
    return aggregate(eval_dirs, Path(config.output_dir) / config.name / "crossval")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training crossval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="experiment YAML")
    parser.add_argument("--folds", type=int, nargs="+", help="only these folds (default: all n_folds)")
    parser.add_argument("--epochs", type=int, help="overrides the config")
    parser.add_argument("--device", help="overrides the config (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--workers", type=int, help="overrides the config: processes preparing augmented batches")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="overrides the config: torch.compile the training step (needs a C++ compiler on the CPU)")
    parser.add_argument("--pixel-mm", type=float, default=DEFAULT_PIXEL_MM,
                        help="in-plane pixel size in mm assumed for data without one, like the PNG export")
    parser.add_argument("--no-robustness", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.load(args.config).override(epochs=args.epochs, device=args.device, workers=args.workers,
                                                    compile=args.compile)
    result = crossval(config, args.folds, pixel_mm=args.pixel_mm, robustness=not args.no_robustness,
                      log=lambda line: print(line, flush=True))
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
