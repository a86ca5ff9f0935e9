"""Several models side by side on what the whole-scan checks trade against each other: infection called
on the healthy scans, infection found on the COVID-19 scan, nodules called infection, and the fit to
the labelled slices. A table (Markdown) and a figure.

    python -m covidseg_training tradeoff --model "control=results/v2/v2_dense_all_continue" \\
        --model "hard negatives=results/v2/v2_dense_all_hardneg_continue" \\
        --curve control,offset1 --out results/v2/tradeoff.md --figure results/v2/tradeoff.png

Each model folder holds a ``wholescan.csv`` (from ``wholescan``) and, optionally, ``train_fit/foldK/
summary.json`` (from ``evaluate`` on the slices it trained on); the model's infection fit is the mean
of those folds' per-case means. A model can also be a wholescan CSV file itself (a committed copy such
as ``results/v2/fold1/wholescan_epoch18.csv``). ``--curve`` joins models in the given order with a line
(for instance one network at stricter infection thresholds, from ``export --infection-offset``);
``--group`` draws models in one colour of their own with a legend entry (for instance the epochs of one
training run, to show how far single checkpoints of one recipe swing).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from CovidInfectionSegLib.atomic import write_text_atomic

HEALTHY_SCANS = ("example-chest-ct-kernel-L", "example-chest-ct-kernel-B")
COVID_SCAN = "covid-chest-ct"
NODULE_SCANS = ("LIDC-IDRI-0003", "LIDC-IDRI-0001")


@dataclass
class ModelResults:
    """One model's whole-scan rows (by scan name) and its infection fit on the labelled slices."""

    label: str
    scans: dict[str, dict[str, str]]
    fit_infection: float | None = None
    fit_folds: int = 0

    def value(self, scan: str, column: str) -> float | None:
        text = self.scans.get(scan, {}).get(column, "")
        return float(text) if text not in ("", None) else None


def read_model(label: str, folder: str | Path) -> ModelResults:
    """Read ``folder/wholescan.csv`` and any ``folder/train_fit/fold*/summary.json``; or, where ``folder``
    is a ``.csv`` file, that wholescan table alone."""
    folder = Path(folder)
    if folder.suffix == ".csv":
        if not folder.is_file():
            raise FileNotFoundError(f"{label}: no file {folder}")
        folder, table, summaries = folder.parent, folder, []
    else:
        table, summaries = folder / "wholescan.csv", sorted(folder.glob("train_fit/fold*/summary.json"))
    if not table.is_file():
        raise FileNotFoundError(f"{label}: no wholescan.csv in {folder} (run `wholescan --out {folder}` first)")
    with table.open(newline="", encoding="utf-8") as handle:
        rows = {row["scan"]: row for row in csv.DictReader(handle)}
    results = ModelResults(label, rows)
    fits = []
    for summary in summaries:
        fits.append(json.loads(summary.read_text(encoding="utf-8"))["per_case"]["infection"]["dice"]["mean"])
    if fits:
        results.fit_infection, results.fit_folds = sum(fits) / len(fits), len(fits)
    return results


def _number(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def table_markdown(models: Sequence[ModelResults]) -> str:
    """One row per model: fit, the healthy kernels (all infection and the largest component), the
    COVID-19 scan, and the LIDC nodules."""
    lines = [
        "| model | fit on its labelled slices, infection Dice | kernel L / B infection, mL | its largest "
        "component, kernel L / B, mL | covid-chest-ct infection, mL (its largest component) | LIDC-IDRI-0003 / "
        "0001 nodule voxels called infection |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        fit = _number(model.fit_infection, 3) + (f" ({model.fit_folds} folds)" if 0 < model.fit_folds < 5 else "")
        kernels = " / ".join(_number(model.value(scan, "infection_ml")) for scan in HEALTHY_SCANS)
        largest = " / ".join(_number(model.value(scan, "largest_infection_component_ml")) for scan in HEALTHY_SCANS)
        covid = (f"{_number(model.value(COVID_SCAN, 'infection_ml'))} "
                 f"({_number(model.value(COVID_SCAN, 'largest_infection_component_ml'))})")
        nodules = " / ".join(_number(model.value(scan, "nodule_infection_percent"), unit="%") for scan in NODULE_SCANS)
        lines.append(f"| {model.label} | {fit} | {kernels} | {largest} | {covid} | {nodules} |")
    return "\n".join(lines) + "\n"


def _mean_over(model: ModelResults, scans: Sequence[str], column: str) -> float | None:
    values = [model.value(scan, column) for scan in scans]
    return None if None in values else sum(values) / len(values)  # type: ignore[arg-type]


def _mean_of_present(model: ModelResults, scans: Sequence[str], column: str) -> float | None:
    values = [value for value in (model.value(scan, column) for scan in scans) if value is not None]
    return sum(values) / len(values) if values else None


def healthy_mean(model: ModelResults) -> float | None:
    """Mean infection mL over the two healthy kernels (None when a kernel is missing)."""
    return _mean_over(model, HEALTHY_SCANS, "infection_ml")


def nodule_mean(model: ModelResults) -> float | None:
    """Mean share (%) of LIDC nodule voxels called infection over the LIDC scans it was checked on (a
    fold model is checked on the one it did not train on)."""
    return _mean_of_present(model, NODULE_SCANS, "nodule_infection_percent")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="covidseg_training tradeoff", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a model's results folder (wholescan.csv, optional train_fit/); repeat for each model")
    parser.add_argument("--curve", metavar="LABEL,LABEL,...", help="models to join with a line, in this order")
    parser.add_argument("--curve-name", default="same weights, stricter infection threshold",
                        help="the legend of the --curve line")
    parser.add_argument("--group", action="append", default=[], metavar="NAME=LABEL,LABEL,...",
                        help="models drawn in one colour, with NAME in the legend; repeat for each group")
    parser.add_argument("--out", required=True, type=Path, help="the Markdown table to write")
    parser.add_argument("--figure", type=Path, help="the PNG figure to write")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    models = []
    for spec in args.model:
        label, separator, folder = spec.partition("=")
        if not separator or not label or not folder:
            raise SystemExit(f"--model {spec!r}: expected LABEL=FOLDER")
        try:
            models.append(read_model(label, folder))
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"--model {spec!r}: {error}") from error
    labels = {model.label for model in models}
    curve = args.curve.split(",") if args.curve else []
    unknown = [label for label in curve if label not in labels]
    if unknown:
        raise SystemExit(f"--curve names models not given with --model: {', '.join(unknown)}")
    group_of: dict[str, str] = {}
    for spec in args.group:
        name, separator, members = spec.partition("=")
        if not separator or not name or not members:
            raise SystemExit(f"--group {spec!r}: expected NAME=LABEL,LABEL,...")
        unknown = [label for label in members.split(",") if label not in labels]
        if unknown:
            raise SystemExit(f"--group {name!r} names models not given with --model: {', '.join(unknown)}")
        twice = [label for label in members.split(",") if label in group_of]
        if twice:
            raise SystemExit(f"--group {name!r}: {', '.join(twice)} already in group {group_of[twice[0]]!r}")
        group_of.update((label, name) for label in members.split(","))
    command = shlex.join(["python", "-m", "covidseg_training", "tradeoff", *argv])
    write_text_atomic(args.out, f"Command: `{command}`\n\n" + table_markdown(models))
    written = [str(args.out)]
    if args.figure:
        from .figures import plot_tradeoff

        points = [{"label": model.label, "covid_found": model.value(COVID_SCAN, "infection_ml"),
                   "healthy_mean": healthy_mean(model), "nodule_mean": nodule_mean(model),
                   "fit": model.fit_infection, "group": group_of.get(model.label)} for model in models]
        plot_tradeoff(points, curve, args.curve_name, args.figure)
        written.append(str(args.figure))
    print(f"wrote {' and '.join(written)} ({len(models)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
