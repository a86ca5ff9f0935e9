"""How the engine's nodule check (post-processing step 6) would act at other thresholds, from `wholescan` folders
made without it (``--no-nodule-check``, or before the check existed).

    python -m covidseg_training nodule_sweep --out DIR WHOLESCAN_FOLDER [WHOLESCAN_FOLDER ...]

Each folder holds ``wholescan.csv`` and ``<scan>_infection_components.csv``: the 26-connected infection
components, as step 6 labels them, with their volume, share of voxels above -100 HU and share inside the LIDC
readers' nodules. A component of at most ``max_ml`` with at least ``min_solid_percent`` solid is what the check
makes lung, so for each pair of thresholds this gives the infection left per scan and the nodule voxels still called
infection, without running the network again. Components under 0.1 mL are not listed (`infection_components`), so
they are counted as kept: the figures can overstate what is left by at most those specks.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any, Sequence

from CovidInfectionSegLib.atomic import write_text_atomic
from CovidInfectionSegLib.postprocessing import MAX_NODULE_ML, MIN_NODULE_SOLID_SHARE

from .infection_components import rows_csv

SOLID_PERCENTS = (15.0, 20.0, 25.0, 30.0, 40.0)  # the engine's 25 among them
BALL_DIAMETERS_MM = (20.0, 30.0, 40.0)
COLUMNS = ("folder", "scan", "model", "max_ml", "min_solid_percent", "infection_ml", "infection_left_ml",
           "nodule_infection_percent", "nodule_infection_left_percent")


def ball_ml(diameter_mm: float) -> float:
    """The volume of a ball of ``diameter_mm`` in mL."""
    return 4.0 / 3.0 * 3.141592653589793 * (diameter_mm / 2.0) ** 3 / 1000.0


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def sweep_scan(scan: dict[str, str], components: Sequence[dict[str, str]], max_ml: float,
               min_solid_percent: float) -> dict[str, Any]:
    """One scan's row of ``wholescan.csv`` and its component rows -> infection and nodule share left."""
    removed = [row for row in components
               if float(row["ml"]) <= max_ml and float(row["solid_percent"]) >= min_solid_percent]
    infection = float(scan["infection_ml"])
    row: dict[str, Any] = {"scan": scan["scan"], "model": f"{scan['model_name']} {scan['model_version']}",
                           "max_ml": max_ml, "min_solid_percent": min_solid_percent, "infection_ml": infection,
                           "infection_left_ml": infection - sum(float(r["ml"]) for r in removed),
                           "nodule_infection_percent": "", "nodule_infection_left_percent": ""}
    if scan.get("nodule_ml"):
        nodule_ml = float(scan["nodule_ml"])
        called_ml = nodule_ml * float(scan["nodule_infection_percent"]) / 100.0
        removed_ml = sum(float(r["ml"]) * float(r["in_nodules_percent"]) / 100.0 for r in removed)
        row.update(nodule_infection_percent=float(scan["nodule_infection_percent"]),
                   nodule_infection_left_percent=max(0.0, 100.0 * (called_ml - removed_ml) / nodule_ml))
    return row


def sweep_folder(folder: Path, max_mls: Sequence[float], solid_percents: Sequence[float]) -> list[dict[str, Any]]:
    """Every scan of one `wholescan` folder at every pair of thresholds."""
    table = folder / "wholescan.csv"
    if not table.is_file():
        raise ValueError(f"{folder}: no wholescan.csv (not a wholescan --out folder?)")
    rows = []
    for scan in read_csv(table):
        if scan["status"] != "ok":
            continue
        if scan.get("nodule_check") == "yes":
            raise ValueError(f"{folder}: {scan['scan']} was post-processed with the nodule check; sweep a "
                             "folder made with --no-nodule-check")
        components = read_csv(folder / f"{scan['scan']}_infection_components.csv")
        rows += [{"folder": str(folder), **sweep_scan(scan, components, max_ml, percent)}
                 for max_ml in max_mls for percent in solid_percents]
    return rows


def unique_runs(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` without repeats of one model on one scan at one pair of thresholds (the first kept): a whole-scan
    folder of an all-data model scores the LIDC scans with fold models, whose own folders hold them too."""
    seen, unique = set(), []
    for row in rows:
        key = (row["scan"], row["model"], row["max_ml"], row["min_solid_percent"])
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per pair of thresholds: per scan the range over folders of the infection left (and lost, for COVID-19
    scans the share kept) and of the nodule voxels still called infection."""
    lines = ["| largest nodule, mL (ball) | solid at least, % | " + " | ".join(sorted({r["scan"] for r in rows})) + " |"]
    scans = sorted({r["scan"] for r in rows})
    lines.append("|---|---|" + "---|" * len(scans))
    for max_ml, percent in sorted({(r["max_ml"], r["min_solid_percent"]) for r in rows}):
        cells = []
        for scan in scans:
            chosen = [r for r in rows if r["scan"] == scan and r["max_ml"] == max_ml and r["min_solid_percent"] == percent]
            kept = [r["infection_left_ml"] / r["infection_ml"] * 100.0 for r in chosen if r["infection_ml"] > 0]
            nodules = [r["nodule_infection_left_percent"] for r in chosen if r["nodule_infection_left_percent"] != ""]
            text = f"infection kept {min(kept):.1f}-{max(kept):.1f}%" if kept else "no infection"
            if nodules:
                text = f"nodules {min(nodules):.1f}-{max(nodules):.1f}%; " + text
            cells.append(f"{text} (n={len(chosen)})")
        lines.append(f"| {max_ml:.1f} | {percent:g} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidseg_training nodule_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="wholescan --out folders made without the nodule check")
    parser.add_argument("--out", required=True, type=Path, help="folder for nodule_sweep.csv and nodule_sweep.md")
    args = parser.parse_args(argv)
    max_mls = [ball_ml(diameter) for diameter in BALL_DIAMETERS_MM]
    try:
        rows = unique_runs([row for folder in args.folders for row in sweep_folder(folder, max_mls, SOLID_PERCENTS)])
    except (OSError, ValueError) as error:
        raise SystemExit(str(error)) from error
    except KeyError as error:
        raise SystemExit(f"a table lacks the column {error} (a wholescan folder from an older version?)") from error
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "nodule_sweep.csv", rows_csv(rows, COLUMNS))
    lines = ["# Nodule check at other thresholds", "",
             f"From {len(args.folders)} wholescan folders without the check: "
             + ", ".join(f"`{folder}`" for folder in args.folders) + ".", "",
             "Per scan, over its models (n: how many; one model on one scan counted once): the nodule voxels still "
             "called infection and the share of the infection kept. Largest nodule: balls of "
             + ", ".join(f"{d:g}" for d in BALL_DIAMETERS_MM) + f" mm. The engine's check: {MAX_NODULE_ML:.1f} mL, "
             f"{MIN_NODULE_SOLID_SHARE:.0%}.", "",
             *sweep_markdown(rows), ""]
    write_text_atomic(args.out / "nodule_sweep.md", "\n".join(lines))
    print("\n".join(lines))
    return 0
