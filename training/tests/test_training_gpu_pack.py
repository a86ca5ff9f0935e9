"""training/gpu/pack.sh, the script that packs what a GPU machine needs, as a real child process, and
run_v2.sh training from what it packed on a machine without the scans: the labelled slices rebuilt from
the two xz parts and checked against their sha256, the negatives from the packed cache alone. The wheels
come from a local folder of small wheels (PIP_NO_INDEX, PIP_FIND_LINKS) instead of PyPI, so the test runs
offline; pip itself picks and copies them."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from covidseg_training.negatives import NEGATIVE_SCANS
from gpu_scripts import TINY, build_wheel, make_training_tree, script_env, write_shared_data
from labelled_slices import write_labelled_slices

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None
                                or shutil.which("sha256sum") is None,
                                reason="pack.sh and run_v2.sh need bash and coreutils (timeout, sha256sum)")


def packed_packages(pack_script: Path) -> list[str]:
    """The packages whose wheels pack.sh downloads, as its loop lists them."""
    text = pack_script.read_text(encoding="utf-8").replace("\\\n", " ")
    return re.search(r"for package in ([^;]+); do", text).group(1).split()


def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "1.0"


def weight(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> dict:
    """pack.sh run once in a training/ tree whose configs/v2_all.yaml reads its negatives from a stand-in of
    ../shared/data, with the wheels of a local folder."""
    root = tmp_path_factory.mktemp("pack")
    training = make_training_tree(root)
    # more slices than the tiny trees' 12, so that they outweigh the negatives' cache, as the real ones do
    write_labelled_slices(training / "data" / "ma2020.npz", slices=180)
    shared = write_shared_data(root / "shared")
    config = {**TINY, "name": "v2_all", "fold": None, "negatives": {"per_epoch": 4, "root": str(shared)}}
    (training / "configs" / "v2_all.yaml").write_text(yaml.safe_dump(config))
    index = root / "index"
    index.mkdir()
    packages = packed_packages(training / "gpu" / "pack.sh")
    for package in packages:
        build_wheel(index, package, installed_version(package))
    env = script_env(training, PYTHON="python", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index),
                     PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run(["bash", str(training / "gpu" / "pack.sh")], env=env, capture_output=True,
                            encoding="utf-8", errors="replace", timeout=900)
    return {"training": training, "packages": packages, "result": result}


def test_pack_writes_two_parts_of_the_same_weight(packed):
    result, gpu = packed["result"], packed["training"] / "data" / "gpu"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(path.name for path in (gpu / "a").iterdir()) == ["ma2020.npz.xz.0", "wheels"]
    assert sorted(path.name for path in (gpu / "b").iterdir()) == ["cache", "ma2020.npz.sha256", "ma2020.npz.xz.1"]
    # the cut balances the two (the 65-byte sha256 file is written after it), both parts holding slices
    assert (gpu / "a" / "ma2020.npz.xz.0").stat().st_size and (gpu / "b" / "ma2020.npz.xz.1").stat().st_size
    assert abs(weight(gpu / "a") - weight(gpu / "b")) <= 100


def test_pack_downloads_each_listed_wheel_at_the_version_installed_here(packed):
    wheels = sorted(path.name for path in (packed["training"] / "data" / "gpu" / "a" / "wheels").iterdir())
    assert "albumentations" in packed["packages"]
    expected = sorted(f"{package.replace('-', '_')}-{installed_version(package)}-py3-none-any.whl"
                      for package in packed["packages"])
    assert wheels == expected


def test_pack_caches_every_negative_scan(packed):
    cache = packed["training"] / "data" / "gpu" / "b" / "cache"
    for name in NEGATIVE_SCANS:
        assert len(list(cache.glob(f"negative-{name}-*.npz"))) == 1, name


def run_from_pack(training: Path, out: Path, runs: str) -> subprocess.CompletedProcess:
    """run_v2.sh as on the GPU machine: one epoch of the all-data run, the negatives' scans out of reach."""
    config = yaml.safe_load((training / "configs" / "v2_all.yaml").read_text())
    config["negatives"]["root"] = str(training / "no-shared-data-here")
    (training / "configs" / "v2_all.yaml").write_text(yaml.safe_dump(config))
    env = script_env(training, OUT=str(out), DEVICE="cpu", WORKERS="0", EPOCHS="1", BUDGET_S="300", KEEP="",
                     JOBS="v2_all", RUNS=runs)
    return subprocess.run(["bash", str(training / "gpu" / "run_v2.sh")], env=env, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=900)


def test_run_v2_rebuilds_the_slices_and_trains_on_the_packed_negatives(packed, tmp_path):
    assert packed["result"].returncode == 0
    training = packed["training"]
    original = training / "data" / "ma2020.original.npz"
    shutil.move(training / "data" / "ma2020.npz", original)
    result = run_from_pack(training, tmp_path / "out", "runs-from-pack")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with np.load(original) as before, np.load(training / "data" / "ma2020.npz") as rebuilt:
        assert sorted(before.files) == sorted(rebuilt.files)
        for name in before.files:
            np.testing.assert_array_equal(before[name], rebuilt[name])
    log = (training / "runs-from-pack" / "logs" / "v2_all.log").read_text(encoding="utf-8")
    assert "negatives: 4 slices per epoch from " + ", ".join(NEGATIVE_SCANS) in log
    assert (training / "runs-from-pack" / "v2_all" / "all" / "history.json").exists()


def flip_a_byte_near_the_end(data: bytes) -> bytes:
    return data[:-40] + bytes([data[-40] ^ 0xFF]) + data[-39:]


@pytest.mark.parametrize("damaged, damage", [
    ("ma2020.npz.xz.1", flip_a_byte_near_the_end),  # xz's own check or the sha256 catches it
    ("ma2020.npz.sha256", lambda data: b"0" * 64 + b"\n"),  # valid xz, other slices: only the sha256 can
])
def test_run_v2_refuses_damaged_slices_and_leaves_none(packed, tmp_path, damaged, damage):
    assert packed["result"].returncode == 0
    training = packed["training"]
    part = training / "data" / "gpu" / "b" / damaged
    intact = part.read_bytes()
    (training / "data" / "ma2020.npz").unlink(missing_ok=True)
    try:
        part.write_bytes(damage(intact))
        result = run_from_pack(training, tmp_path / "out", f"runs-{damaged}")
    finally:
        part.write_bytes(intact)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    assert not (training / "data" / "ma2020.npz").exists()
    assert not list((training / f"runs-{damaged}" / "logs").glob("*.log")), "no run may start on damaged slices"
