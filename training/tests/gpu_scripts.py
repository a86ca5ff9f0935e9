"""training/gpu/run_v2.sh and after_v2.sh as real child processes on the CPU, in a training/ tree of their
own: tiny runs of five folds and an all-data model (run_v2.sh), and a stand-in for ../shared/data of
small synthetic scans under the real scans' names, for after_v2.sh's whole-scan checks."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import SimpleITK as sitk
import yaml

from covidseg_training.wholescan import DEFAULT_SCANS
from labelled_slices import write_labelled_slices
from whole_chest import chest_image, write_nodule_read


def _engine_test_module(name: str):
    """A helper module of the engine's tests (Testing/<name>.py), which is not on this suite's path."""
    spec = importlib.util.spec_from_file_location(
        f"_engine_{name}", Path(__file__).resolve().parents[2] / "Testing" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


write_dicom_series = _engine_test_module("dicom_series").write_dicom_series
build_wheel = _engine_test_module("local_wheels").build_wheel

GPU_SCRIPTS = Path(__file__).resolve().parents[1] / "gpu"
TINY = {"name": "tiny", "n_folds": 5, "fold": 0, "seed": 0, "input_size": 64, "base_channels": 4, "depth": 2,
        "epochs": 2, "batch_size": 4, "learning_rate": 0.01, "warmup_epochs": 1, "patience": 30, "threads": 1,
        "device": "cpu", "data": "", "output_dir": "runs"}
# A tiny network's best.pt is 53 KiB, its float16 copy 36 KiB: both over the limit, so each goes as a copy
# in a tar of its own, and a second call must not copy the copy over the original.
FILE_LIMIT_KIB = 30
KEPT = [f"tiny/fold{fold}" for fold in range(5)] + ["tiny_all/all"]  # the runs whose best.pt come back (KEEP)


def script_env(training: Path, **settings: str) -> dict[str, str]:
    """The environment of a script call: ``python3`` and ``python`` on PATH are this interpreter, with the
    project installed, and utf-8 output whatever the locale (crossval prints "±")."""
    bin_dir = training.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "python"):
        launcher = bin_dir / name
        if not launcher.exists():
            # a script that runs it by its own path, not a symlink: a symlinked virtual environment's
            # python, outside its folder, starts as the base interpreter without the environment's packages
            launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n', encoding="utf-8")
            launcher.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONIOENCODING": "utf-8",
            **settings}


def run_gpu_script(training: Path, out: Path) -> subprocess.CompletedProcess:
    """run_v2.sh on the CPU: five tiny folds and the all-data model, their kept checkpoints into ``out``."""
    env = script_env(training, OUT=str(out), DEVICE="cpu", WORKERS="0", BUDGET_S="300", KEEP="tiny tiny_all",
                     FILE_LIMIT_KIB=str(FILE_LIMIT_KIB), JOBS="tiny:0 tiny:1 tiny:2 tiny:3 tiny:4 tiny_all")
    return subprocess.run(["bash", str(training / "gpu" / "run_v2.sh")], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=900)


def run_after_script(training: Path, files_at: Path, shared: Path, folds: str) -> subprocess.CompletedProcess:
    """after_v2.sh on what run_v2.sh left in ``files_at``, with ``shared`` as the shared data folder."""
    env = script_env(training, RECIPE="tiny", FOLDS=folds, DATA=str(shared), LABELLED="data/ma2020.npz",
                     PRECISION="fp32")
    return subprocess.run(["bash", str(training / "gpu" / "after_v2.sh"), str(files_at)], env=env,
                          capture_output=True, encoding="utf-8", errors="replace", timeout=900)


def make_training_tree(root: Path) -> Path:
    """A training/ folder with the three scripts, the tiny configs and data/ma2020.npz, as pack.sh leaves it."""
    training = root / "training"
    (training / "gpu").mkdir(parents=True)
    for script in ("pack.sh", "run_v2.sh", "after_v2.sh"):
        shutil.copy2(GPU_SCRIPTS / script, training / "gpu" / script)
    (training / "configs").mkdir()
    (training / "configs" / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (training / "configs" / "tiny_all.yaml").write_text(yaml.safe_dump({**TINY, "name": "tiny_all", "fold": None}))
    (training / "data").mkdir()
    write_labelled_slices(training / "data" / "ma2020.npz")
    return training


def write_shared_data(root: Path) -> Path:
    """Every scan of ``wholescan.DEFAULT_SCANS`` at its path under ``root``: the synthetic whole chest (a
    different seed each), the LIDC scans with a read outlining 7 x 7 pixels of the right lung."""
    for seed, (relative, _targets, _low, nodules) in enumerate(DEFAULT_SCANS.values()):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".nii", ".gz"):
            sitk.WriteImage(chest_image(seed), str(path))
        else:
            write_dicom_series(chest_image(seed), path)
        if nodules:
            write_nodule_read(root / nodules)
    return root
