"""Folds evaluated one by one -> the cross-validation tables, as ``crossval`` writes them.

    python -m covidseg_training aggregate OUT 0=FOLDER0 1=FOLDER1 ... 4=FOLDER4

Each FOLDER holds one fold's ``evaluate`` output (``per_case.csv`` and ``summary.json``): a run's
``foldK/eval``, or the copy under ``training/results``. Where the fold's training history is in the
folder or beside it, ``summary.json`` also gets the epoch-selection scores. OUT gets per_case.csv,
folds.csv, summary.csv, summary.json and boxplot.png (``crossval.aggregate``). Use it for folds that
were trained apart (on different machines, or a fold at a time over sessions) instead of ``crossval``,
which trains what is missing first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .crossval import aggregate, print_summary


def parse_folds(items: list[str]) -> dict[int, Path]:
    """``FOLD=FOLDER`` arguments -> {fold: folder}; a malformed, repeated or incomplete one is refused."""
    folds: dict[int, Path] = {}
    for item in items:
        fold, separator, folder = item.partition("=")
        if not separator or not fold.isdigit() or not folder:
            raise SystemExit(f"{item!r}: expected FOLD=FOLDER, for instance 0=results/v2/v2/fold0")
        if int(fold) in folds:
            raise SystemExit(f"fold {fold} given twice")
        missing = [name for name in ("per_case.csv", "summary.json") if not (Path(folder) / name).is_file()]
        if missing:
            raise SystemExit(f"{folder}: no {' or '.join(missing)} (the output of evaluate)")
        folds[int(fold)] = Path(folder)
    return folds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training aggregate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the cross-validation tables")
    parser.add_argument("folds", nargs="+", metavar="FOLD=FOLDER", help="a fold's evaluation folder")
    args = parser.parse_args(argv)
    print_summary(aggregate(parse_folds(args.folds), args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
