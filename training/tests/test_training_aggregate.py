"""``aggregate``: folds evaluated one by one give the cross-validation tables that ``crossval`` gives.

The check is on the committed v2 recipe (v2_dense_hardneg): its five folds' evaluation tables, copied
into training/results, aggregated again must give its committed crossval/ tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAINING = Path(__file__).parents[1]
RECIPE = TRAINING / "results" / "v2" / "v2_dense_hardneg"


def run_aggregate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covidseg_training", "aggregate", *args], capture_output=True,
                          text=True, encoding="utf-8", cwd=TRAINING, timeout=300)  # it prints ±, whatever the locale


def test_the_committed_folds_give_the_committed_cross_validation(tmp_path):
    out = tmp_path / "crossval"
    done = run_aggregate(str(out), *(f"{fold}={RECIPE / f'fold{fold}'}" for fold in range(5)))
    assert done.returncode == 0, done.stderr
    assert "infection_dice: 0.7" in done.stdout and "over 5 folds" in done.stdout
    assert "at each fold's last epoch (no held-out case chose it): lung_dice 0.98" in done.stdout  # as crossval prints
    for table in ("per_case.csv", "folds.csv", "summary.csv"):
        assert (out / table).read_bytes() == (RECIPE / "crossval" / table).read_bytes(), table
    ours, committed = (json.loads((folder / "summary.json").read_text()) for folder in (out, RECIPE / "crossval"))
    for key in ("folds", "per_fold", "over_folds", "over_cases", "healthy_lung_called_infection"):
        assert ours[key] == committed[key], key
    # the folds' histories (in each fold's folder) give the epoch-selection scores too
    # (these folds' eval/ summaries predate the evaluated epoch's record: theirs is None, and not in the committed file)
    assert {fold: {k: v for k, v in row.items() if k != "evaluated_epoch"}
            for fold, row in ours["epoch_selection"]["per_fold"].items()} == committed["epoch_selection"]["per_fold"]
    assert ours["epoch_selection"]["evaluated_at"] == "unknown"
    assert (out / "boxplot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["0"], "'0': expected FOLD=FOLDER"),
    (["x=results"], "'x=results': expected FOLD=FOLDER"),
    ([f"0={RECIPE / 'fold0'}", f"0={RECIPE / 'fold1'}"], "fold 0 given twice"),
    (["0=results/v2"], "results/v2: no per_case.csv or summary.json (the output of evaluate)"),
])
def test_bad_folds_are_refused_before_anything_is_written(tmp_path, args, message):
    done = run_aggregate(str(tmp_path / "crossval"), *args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(f"aggregate: {message}") and "\n" not in done.stderr.strip()
    assert not (tmp_path / "crossval").exists()
