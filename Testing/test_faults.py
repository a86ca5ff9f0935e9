"""Fault injection with real child processes: kill -9 at every output file and in the middle of moving a
result in, Ctrl-C twice while writing, a killed batch resumed, a killed summary write, two batches on one
folder, a summary that becomes unwritable, and full and read-only output folders (a small tmpfs in a
private mount namespace where one can be mounted, else a simulated ENOSPC).

Children stop at an exact point through the test-only hook in atomic.pause_point
($COVIDSEG_TEST_PAUSE_AT / $COVIDSEG_TEST_PAUSE_FILE), inert without those variables. The README's
reliability table lists what these tests verify (test_readme_reliability_table_names_real_tests)."""

from __future__ import annotations

import csv
import errno
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from shared_data import REPO, shared_path

from CovidInfectionSegLib.atomic import COMMIT_LOCK_NAME, PAUSE_AT_ENV, PAUSE_FILE_ENV
from CovidInfectionSegLib.cli import EXIT_CANCELLED, EXIT_OK, EXIT_OUTPUT_IN_USE, EXIT_SCANS_FAILED, EXIT_USAGE, main
from CovidInfectionSegLib.sample_data import synthetic_chest

CHILD_TIMEOUT_S = 300
KILL_POINTS = ["staged:segmentation", "staged:labelmap", "staged:measurements_csv", "staged:measurements_json",
               "staged:preview", "commit"]


def small_chest(seed: int) -> sitk.Image:
    return synthetic_chest(size=(80, 72, 12), spacing=(4.0, 4.0, 10.0), seed=seed)


def covidseg(*args: object) -> list[str]:
    return [sys.executable, "-m", "CovidInfectionSegLib.cli", *map(str, args)]


def start_paused(command: list[str], point: str, pause_file: Path) -> subprocess.Popen:
    """Start ``command`` and return once it waits at the pause ``point`` (its pid is in ``pause_file``)."""
    env = {**os.environ, PAUSE_AT_ENV: point, PAUSE_FILE_ENV: str(pause_file), "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not pause_file.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"exited with {child.returncode} before reaching {point}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            child.kill()
            child.communicate()
            pytest.fail(f"did not reach {point} within {CHILD_TIMEOUT_S} s")
        time.sleep(0.02)
    assert int(pause_file.read_text().split()[0]) == child.pid
    return child


def kill_9(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL


def release(child: subprocess.Popen, pause_file: Path) -> tuple[int, str, str]:
    pause_file.unlink()
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    return child.returncode, out, err


def visible(folder: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``folder`` (relative path -> bytes)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries under ``folder`` other than the lock files that stay by design."""
    kept = {COMMIT_LOCK_NAME, ".covidseg-batch.lock", ".covidseg-batch.owner"}
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob(".*") if path.name not in kept)


def read_summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["scan"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def two_versions(tmp_path) -> tuple[Path, Path]:
    """Two different scans with the same name: v1/alpha.nii.gz (the previous result), v2/alpha.nii.gz (the new one)."""
    paths = []
    for version, seed in (("v1", 0), ("v2", 5)):
        (tmp_path / version).mkdir()
        sitk.WriteImage(small_chest(seed), str(tmp_path / version / "alpha.nii.gz"))
        paths.append(tmp_path / version / "alpha.nii.gz")
    return paths[0], paths[1]


@pytest.fixture
def scan_folder(tmp_path) -> Path:
    folder = tmp_path / "scans"
    folder.mkdir()
    for seed, name in enumerate(("alpha", "beta", "gamma")):
        sitk.WriteImage(small_chest(seed), str(folder / f"{name}.nii.gz"))
    return folder


def model_args(manifest: Path) -> list[str]:
    return ["--model", str(manifest), "--device", "cpu", "-q"]


# --------------------------------------------------------------------------------- segment: kill -9


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_each_output_file_keeps_the_previous_result(tmp_path, two_versions, tiny_model_manifest, point):
    old, new = two_versions
    out = tmp_path / "out"
    assert main(["segment", str(old), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(out)
    assert len(previous) == 5

    child = start_paused(covidseg("segment", new, "-o", out, *model_args(tiny_model_manifest)), point,
                         tmp_path / "paused")
    kill_9(child)
    if point == "commit":  # killed while moving a complete result in: it is finished by the next run
        assert visible(out) != previous and any(name.endswith(".complete") for name in leftovers(out))
    else:
        assert visible(out) == previous  # byte for byte
        assert any(name.endswith(".partial") for name in leftovers(out))

    sitk.WriteImage(small_chest(9), str(tmp_path / "beta.nii.gz"))  # the next run on the folder, another scan
    assert main(["segment", str(tmp_path / "beta.nii.gz"), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    assert leftovers(out) == []
    alpha = {name: data for name, data in visible(out).items() if name.startswith("alpha.")}
    if point == "commit":
        reference = tmp_path / "reference"  # a child too: the same torch thread count as the killed one
        subprocess.run(covidseg("segment", new, "-o", reference, *model_args(tiny_model_manifest)), check=True,
                       capture_output=True, timeout=CHILD_TIMEOUT_S)
        for name in ("alpha.measurements.csv", "alpha.preview.png"):
            assert alpha[name] == (reference / name).read_bytes(), name
        for name in ("alpha.seg.nrrd", "alpha.labels.nii.gz"):  # gzip headers carry a time: compare voxels
            np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / name))),
                                          sitk.GetArrayFromImage(sitk.ReadImage(str(reference / name))))
        assert json.loads(alpha["alpha.measurements.json"])["source"] == str(new)
    else:
        assert alpha == previous


def test_kill_9_as_soon_as_the_staging_folder_appears(tmp_path, two_versions, tiny_model_manifest):
    """No hook: the child is killed the moment its staging folder shows up, wherever it is then."""
    old, new = two_versions
    out = tmp_path / "out"
    assert main(["segment", str(old), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(out)
    child = subprocess.Popen(covidseg("segment", new, "-o", out, *model_args(tiny_model_manifest)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not any(".covidseg-" in name and not name.endswith(".lock") for name in leftovers(out)):
        assert child.poll() is None, "finished before its staging folder was seen"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    sitk.WriteImage(small_chest(9), str(tmp_path / "beta.nii.gz"))  # the next run on the folder, another scan
    assert main(["segment", str(tmp_path / "beta.nii.gz"), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    assert leftovers(out) == []
    after = {name: data for name, data in visible(out).items() if name.startswith("alpha.")}
    assert after == previous or json.loads(after["alpha.measurements.json"])["source"] == str(new)
    assert sorted(after) == sorted(previous)


def test_ctrl_c_twice_while_writing_keeps_the_previous_result(tmp_path, two_versions, tiny_model_manifest):
    old, new = two_versions
    out = tmp_path / "out"
    assert main(["segment", str(old), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(out)
    child = start_paused(covidseg("segment", new, "-o", out, "--model", tiny_model_manifest, "--device", "cpu"),
                         "staged:labelmap", tmp_path / "paused")
    child.send_signal(signal.SIGINT)
    time.sleep(0.3)
    child.send_signal(signal.SIGINT)
    _out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == EXIT_CANCELLED, err
    assert "Ctrl-C again to stop now" in err and "covidseg: cancelled" in err and "Traceback" not in err
    assert visible(out) == previous and leftovers(out) == []  # the child cleaned up after itself


# ----------------------------------------------------------------------------------- batch faults


def test_kill_9_during_a_batch_then_resume(tmp_path, scan_folder, tiny_model_manifest):
    out = tmp_path / "out"
    child = start_paused(covidseg("batch", scan_folder, "-o", out, *model_args(tiny_model_manifest)),
                         "staged:preview#2", tmp_path / "paused")  # the second scan's last file
    kill_9(child)
    assert {name: row["status"] for name, row in read_summary(out / "summary.csv").items()} == {"alpha": "ok"}
    assert not visible(out / "beta") and any(name.startswith("beta/") for name in leftovers(out))
    alpha = visible(out / "alpha")

    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"alpha": "skipped", "beta": "ok", "gamma": "ok"}
    assert visible(out / "alpha") == alpha and len(visible(out / "beta")) == 5
    assert leftovers(out) == []


def test_kill_9_while_writing_the_summary_keeps_the_previous_one(tmp_path, scan_folder, tiny_model_manifest):
    out = tmp_path / "out"
    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    summary = (out / "summary.csv").read_bytes()
    child = start_paused(covidseg("batch", scan_folder, "-o", out, "--overwrite", *model_args(tiny_model_manifest)),
                         "summary", tmp_path / "paused")
    kill_9(child)
    assert (out / "summary.csv").read_bytes() == summary
    assert any(re.fullmatch(r"\.summary\.csv\..*\.part\.csv", name) for name in leftovers(out))
    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    assert leftovers(out) == []


def test_a_second_batch_on_the_same_folder_is_refused(tmp_path, scan_folder, tiny_model_manifest):
    out = tmp_path / "out"
    first = start_paused(covidseg("batch", scan_folder, "-o", out, *model_args(tiny_model_manifest)), "scan",
                         tmp_path / "paused")
    second = subprocess.run(covidseg("batch", scan_folder, "-o", out, *model_args(tiny_model_manifest)),
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert second.returncode == EXIT_OUTPUT_IN_USE
    assert f"is in use by another covidseg batch (pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    code, _out, err = release(first, tmp_path / "paused")
    assert code == EXIT_OK, err
    assert {row["status"] for row in read_summary(out / "summary.csv").values()} == {"ok"}
    # the lock went with the process: a later batch gets the folder
    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK


def test_a_killed_batch_leaves_no_lock(tmp_path, scan_folder, tiny_model_manifest):
    out = tmp_path / "out"
    kill_9(start_paused(covidseg("batch", scan_folder, "-o", out, *model_args(tiny_model_manifest)), "scan",
                        tmp_path / "paused"))
    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK


def test_summary_that_becomes_unwritable_mid_run_exits_4(tmp_path, scan_folder, tiny_model_manifest):
    out = tmp_path / "out"
    child = start_paused(covidseg("batch", scan_folder, "-o", out, *model_args(tiny_model_manifest)), "scan#2",
                         tmp_path / "paused")
    (out / "summary.csv").unlink()
    (out / "summary.csv").mkdir()  # now a folder: the summary cannot be written
    code, _out, err = release(child, tmp_path / "paused")
    assert code == EXIT_OUTPUT_IN_USE
    assert "cannot write the batch summary" in err and "a run after fixing this resumes" in err
    assert "Traceback" not in err
    # the batch stops at the first summary write that fails; the scans done are kept
    assert all(len(visible(out / name)) == 5 for name in ("alpha", "beta"))
    (out / "summary.csv").rmdir()
    assert main(["batch", str(scan_folder), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    statuses = {name: row["status"] for name, row in read_summary(out / "summary.csv").items()}
    assert statuses["alpha"] == statuses["beta"] == "skipped" and statuses["gamma"] in ("skipped", "ok")


def test_real_scans_killed_batch_resumes(tmp_path, tiny_model_manifest):
    """The shared abdominal CT, as NIfTI and as a DICOM series: kill -9 inside the second, then resume."""
    source = shared_path("example-abdominal-ct")
    out = tmp_path / "out"
    child = start_paused(covidseg("batch", source, "-o", out, "--no-preview", *model_args(tiny_model_manifest)),
                         "staged:measurements_json#2", tmp_path / "paused")
    kill_9(child)
    assert main(["batch", str(source), "-o", str(out), "--no-preview", *model_args(tiny_model_manifest)]) == EXIT_OK
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"dicom": "ok", "example_ct": "skipped"}
    assert leftovers(out) == []


# --------------------------------------------------------------------- full and read-only folders


@functools.lru_cache(maxsize=1)
def tmpfs_problem() -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here (None when it can)."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {probe.stderr.strip()}"


def run_on_tmpfs(tmp_path: Path, size_kb: int, command: list[str], seed: Path | None = None,
                 read_only: bool = False) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run ``command`` with a tmpfs of ``size_kb`` mounted on ``tmp_path/mnt`` (seeded with a copy of
    ``seed``, then made read-only if asked) in a private mount namespace; return the result, the mount
    point (as the command saw it) and a copy of what the tmpfs held afterwards."""
    mount, after = tmp_path / "mnt", tmp_path / "after"
    mount.mkdir()
    after.mkdir()
    script = (f'mount -t tmpfs -o size={size_kb}k tmpfs "$1" || exit 90; '
              + ('cp -a "$2"/. "$1"/ || exit 91; ' if seed else "")
              + ('mount -o remount,ro "$1" || exit 92; ' if read_only else "")
              + 'target="$1"; copy="$3"; shift 3; "$@"; rc=$?; cp -a "$target"/. "$copy"/; exit $rc')
    completed = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(mount), str(seed or ""), str(after),
                                *command], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert completed.returncode < 90, completed.stderr
    return completed, mount, after


needs_tmpfs = pytest.mark.skipif(tmpfs_problem() is not None,
                                 reason=f"{tmpfs_problem()}; the simulated full and read-only tests run instead")


@needs_tmpfs
def test_full_disk_during_segment_keeps_the_previous_result(tmp_path, two_versions, tiny_model_manifest):
    old, new = two_versions
    previous_dir = tmp_path / "previous"
    assert main(["segment", str(old), "-o", str(previous_dir), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(previous_dir)
    # room for the previous result and the small new files, not for the new preview (written last)
    size_kb = sum(len(data) for data in previous.values()) // 1024 + 300
    completed, mount, after = run_on_tmpfs(tmp_path, size_kb, covidseg("segment", new, "-o", tmp_path / "mnt",
                                                                        *model_args(tiny_model_manifest)),
                                           seed=previous_dir)
    assert completed.returncode == EXIT_USAGE
    assert "No space left on device" in completed.stderr and "Traceback" not in completed.stderr
    assert visible(after) == previous and leftovers(after) == []


@needs_tmpfs
def test_full_disk_during_batch_fails_the_scans_clearly(tmp_path, scan_folder, tiny_model_manifest):
    completed, _mount, after = run_on_tmpfs(tmp_path, 200, covidseg("batch", scan_folder, "-o", tmp_path / "mnt",
                                                                     *model_args(tiny_model_manifest)))
    assert completed.returncode == EXIT_SCANS_FAILED, completed.stderr
    rows = read_summary(after / "summary.csv")
    assert {row["status"] for row in rows.values()} == {"failed"}
    assert all("No space left on device" in row["error"] for row in rows.values())
    assert sorted(visible(after)) == ["summary.csv"] and leftovers(after) == []


@needs_tmpfs
def test_read_only_output_folder_is_refused_and_untouched(tmp_path, two_versions, scan_folder, tiny_model_manifest):
    old, new = two_versions
    previous_dir = tmp_path / "previous"
    assert main(["segment", str(old), "-o", str(previous_dir), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(previous_dir)
    completed, mount, after = run_on_tmpfs(tmp_path, 4096, covidseg("segment", new, "-o", tmp_path / "mnt",
                                                                     *model_args(tiny_model_manifest)),
                                           seed=previous_dir, read_only=True)
    assert completed.returncode == EXIT_USAGE
    assert f"output folder {mount} is not writable" in completed.stderr
    assert visible(after) == previous


@needs_tmpfs
def test_read_only_batch_folder_exits_4(tmp_path, scan_folder, tiny_model_manifest):
    previous_dir = tmp_path / "previous"
    assert main(["batch", str(scan_folder), "-o", str(previous_dir), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(previous_dir)
    completed, mount, after = run_on_tmpfs(tmp_path, 4096, covidseg("batch", scan_folder, "-o", tmp_path / "mnt",
                                                                     "--overwrite", *model_args(tiny_model_manifest)),
                                           seed=previous_dir, read_only=True)
    assert completed.returncode == EXIT_OUTPUT_IN_USE
    assert f"cannot write the batch summary: output folder {mount} is not writable" in completed.stderr
    assert visible(after) == previous


@pytest.mark.skipif(tmpfs_problem() is None, reason="a real full tmpfs is tried instead")
def test_full_disk_simulated_keeps_the_previous_result(tmp_path, two_versions, tiny_model_manifest, monkeypatch, capsys):
    """Where no tmpfs can be mounted: the preview write fails with ENOSPC half way."""
    from CovidInfectionSegLib import outputs

    old, new = two_versions
    out = tmp_path / "out"
    assert main(["segment", str(old), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(out)

    def disk_full(ct_image, labelmap, segments, measurements, path, title=""):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_preview_png", disk_full)
    assert main(["segment", str(new), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_USAGE
    assert "No space left on device" in capsys.readouterr().err
    assert visible(out) == previous and leftovers(out) == []


@pytest.mark.skipif(tmpfs_problem() is None, reason="a real read-only tmpfs is tried instead")
def test_read_only_output_folder_simulated(tmp_path, two_versions, tiny_model_manifest):
    if os.geteuid() == 0:
        pytest.skip("root writes through permissions, and no tmpfs can be mounted here")
    old, new = two_versions
    out = tmp_path / "out"
    assert main(["segment", str(old), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OK
    previous = visible(out)
    out.chmod(0o555)
    try:
        assert main(["segment", str(new), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_USAGE
        assert main(["batch", str(new.parent), "-o", str(out), *model_args(tiny_model_manifest)]) == EXIT_OUTPUT_IN_USE
    finally:
        out.chmod(0o755)
    assert visible(out) == previous


# ------------------------------------------------------------------------------------------ README


def test_readme_reliability_table_names_real_tests():
    """Every row of the README's table of faults names the tests that verify it, and they exist."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not set(line) <= set("|-: ")]
    assert len(rows) >= 15
    sources = "\n".join(path.read_text(encoding="utf-8") for path in (REPO / "Testing").glob("test_*.py"))
    for row in rows:
        names = re.findall(r"`(test_\w+)`", row)
        assert names, f"no test named in: {row}"
        for name in names:
            assert f"def {name}(" in sources, f"{name} (README) is not a test"
