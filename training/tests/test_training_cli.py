"""``python -m covidseg_training``: commands, and a missing file said in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The command in a child process of this interpreter, where the project is installed (as gpu_scripts runs it)."""
    return subprocess.run([sys.executable, "-m", "covidseg_training", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("args, named", [
    (("train", "missing.yaml"), "missing.yaml"),
    (("crossval", "missing.yaml", "--folds", "1"), "missing.yaml"),
    (("robustness", "--checkpoint", "missing.pt", "--out", "out"), "missing.pt: checkpoint not found"),
    (("prepare", "--png", "no-export", "--out", "out.npz"), "cases.csv not found: expected the Ma et al. 2020 PNG"),
])
def test_a_missing_file_is_one_line_and_exit_2(tmp_path, args, named):
    done = run_cli(*args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{args[0]}: ") and named in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


def test_usage_and_an_unknown_command(tmp_path):
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0 and "wholescan" in done.stdout and "ensemble" in done.stdout
    done = run_cli("tran", cwd=tmp_path)
    assert done.returncode == 2 and "unknown command 'tran'" in done.stderr


def test_a_refused_argument_is_one_line_and_exit_2(tmp_path):
    # Commands that refuse an argument with a message of their own (tradeoff, wholescan, evaluate) exit 2 as
    # argparse does, not 1.
    done = run_cli("tradeoff", "--model", f"x={tmp_path / 'missing'}", "--out", "t.md", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("tradeoff: ") and "no wholescan.csv" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir()), "nothing written"
