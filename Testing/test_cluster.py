"""``covidseg batch --ray`` and cluster.run_ray_batch on a real local Ray instance (one per module,
``ray.init(num_cpus=2)``), real scans from ../shared/data, the tiny real TorchScript model and the bundled
one: the same results as the local batch, workers killed once and every time, a driver killed and
cancelled, then resumed. Workers die through the test-only hook in cluster.kill_point
($COVIDSEG_TEST_KILL_WORKER), the driver stops at atomic.pause_point("ray-row"); both are inert unless set.

The Ray tests skip with the reason when Ray is not installed; the messages and checks that need no Ray
run everywhere."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_factory import HalfBlindNet, write_model_package
from phantoms import chest_phantom, lung_and_infection_net
from shared_data import shared_path
from test_faults import kill_9, leftovers, read_summary, start_paused, visible

from CovidInfectionSegLib.batch import (
    SUMMARY_COLUMNS,
    discover,
    expected_outputs,
    run_local_batch,
    segment_and_write_files,
)
from CovidInfectionSegLib.cli import EXIT_MODEL, EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE, main
from CovidInfectionSegLib.cluster import (
    KILL_WORKER_ENV,
    KILL_WORKER_ONCE_ENV,
    ClusterError,
    RayNotInstalledError,
    assigned_device,
    import_ray,
    kill_point,
    pool_size,
    run_ray_batch,
)
from CovidInfectionSegLib.inference import SegmentationCancelled
from CovidInfectionSegLib.model_package import load_model_package
from CovidInfectionSegLib.pipeline import segment_image

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason='Ray is not installed (pip install -e ".[distributed]")')
# fp32 wherever the network's arithmetic is selectable, so the local and the Ray runs compute alike
FP32 = {"precision": "fp32"} if "precision" in inspect.signature(segment_image).parameters else {}
FP32_ARGS = [f"--{key}={value}" for key, value in FP32.items()]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the whole module (2 CPUs); its address for drivers in child processes."""
    if ray is None:
        pytest.skip('Ray is not installed (pip install -e ".[distributed]")')
    # "local": a new instance even where $RAY_ADDRESS is set or a cluster runs on this machine
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield context.address_info["address"]
    ray.shutdown()


def link_folder(folder: Path, links: dict[str, Path]) -> Path:
    """``folder`` holding symbolic links ``name -> target``; a DICOM folder becomes a folder of linked files
    (discovery does not follow linked folders)."""
    for name, target in links.items():
        if target.is_dir():
            (folder / name).mkdir(parents=True)
            for file in sorted(target.iterdir()):
                (folder / name / file.name).symlink_to(file)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).symlink_to(target)
    return folder


@pytest.fixture(scope="module")
def real_scans(tmp_path_factory) -> Path:
    """The abdominal CT as NIfTI and as a DICOM series, and the real chest CT."""
    return link_folder(tmp_path_factory.mktemp("real") / "scans", {
        "example_ct.nii.gz": shared_path("example-abdominal-ct", "example_ct.nii.gz"),
        "dicom": shared_path("example-abdominal-ct", "dicom"),
        "Lung_Dx-A0001_kernel-B.nii.gz": shared_path("example-chest-ct", "Lung_Dx-A0001_kernel-B.nii.gz"),
    })


@pytest.fixture
def small_scans(tmp_path) -> Path:
    """Three small real scans: the abdominal NIfTI under two names, and its DICOM series."""
    nifti = shared_path("example-abdominal-ct", "example_ct.nii.gz")
    return link_folder(tmp_path / "scans", {"example_ct.nii.gz": nifti, "same_ct.nii.gz": nifti,
                                             "dicom": shared_path("example-abdominal-ct", "dicom")})


def statuses(out: Path) -> dict[str, str]:
    return {name: row["status"] for name, row in read_summary(out / "summary.csv").items()}


def labels(folder: Path, stem: str) -> dict[str, np.ndarray]:
    return {suffix: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{stem}{suffix}")))
            for suffix in (".labels.nii.gz", ".seg.nrrd")}


def assert_same_results(local: Path, clustered: Path) -> None:
    """Same summary (every column but ``seconds``), same labelmaps voxel for voxel, same measurements."""
    local_rows, cluster_rows = read_summary(local / "summary.csv"), read_summary(clustered / "summary.csv")
    assert list(local_rows) == list(cluster_rows)
    for name, row in local_rows.items():
        assert row["status"] == "ok", row
        for column in SUMMARY_COLUMNS:
            if column != "seconds":
                assert cluster_rows[name][column] == row[column], (name, column)
        stem = Path(name).name
        for suffix, array in labels(local / name, stem).items():
            np.testing.assert_array_equal(labels(clustered / name, stem)[suffix], array, err_msg=f"{name}{suffix}")
        csv_name, json_name = f"{stem}.measurements.csv", f"{stem}.measurements.json"
        assert (clustered / name / csv_name).read_bytes() == (local / name / csv_name).read_bytes()
        records = [json.loads((out / name / json_name).read_text()) for out in (local, clustered)]
        for record in records:
            record.pop("timings_s")
        assert records[0] == records[1]


# ------------------------------------------------------------------------------- without a cluster


def test_without_ray_batch_ray_says_what_to_install(tmp_path, small_scans, tiny_model_manifest, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    with pytest.raises(RayNotInstalledError, match=r'pip install -e "\.\[distributed\]"'):
        import_ray()
    code = main(["batch", str(small_scans), "-o", str(tmp_path / "out"), "--model", str(tiny_model_manifest), "--ray"])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert 'needs Ray, which is not installed here: pip install -e ".[distributed]"' in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # the engine and the command import without Ray (only --ray needs it)
    subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; "
                    "from CovidInfectionSegLib import cli, cluster"], check=True, timeout=120)


def test_cluster_options_need_ray_and_the_device_comes_from_ray(tmp_path, small_scans, tiny_model_manifest, capsys):
    base = ["batch", str(small_scans), "-o", str(tmp_path / "out"), "--model", str(tiny_model_manifest)]
    assert main([*base, "--gpus-per-worker", "0.25", "--workers", "2"]) == EXIT_USAGE
    assert "--gpus-per-worker, --workers: only with --ray" in capsys.readouterr().err
    assert main([*base, "--ray", "--device", "cpu"]) == EXIT_USAGE
    assert "each worker uses the device Ray assigns to it" in capsys.readouterr().err
    assert main([*base, "--ray", "--cpus-per-worker", "0"]) == EXIT_USAGE
    assert "must be a positive number" in capsys.readouterr().err
    assert main([*base, "--ray", "--precision", "fp16"]) == EXIT_USAGE
    assert "--precision fp16 is for CUDA only, and with --ray the workers run on their CPUs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pool_size_follows_the_cluster():
    assert pool_size({"CPU": 16.0, "GPU": 2.0}, 2, 0.25, None, 100) == 8  # 8 GPU quarters, 8 CPU pairs
    assert pool_size({"CPU": 16.0, "GPU": 2.0}, 1, 0.25, None, 100) == 8  # the GPUs limit it
    assert pool_size({"CPU": 16.0}, 2, 0, None, 3) == 3  # no more workers than scans
    assert pool_size({"CPU": 16.0}, 2, 0, 5, 100) == 5
    assert pool_size({"CPU": 1.0}, 0.5, 0, None, 10) == 2
    with pytest.raises(ClusterError, match="has 2 CPUs and 0 GPUs, not enough for one worker .1 CPUs and 0.5 GPUs"):
        pool_size({"CPU": 2.0}, 1, 0.5, None, 10)
    with pytest.raises(ClusterError, match="not enough for one worker .3 CPUs"):
        pool_size({"CPU": 2.0}, 3, 0, None, 10)


def test_a_worker_without_gpus_uses_the_cpu_and_assigned_gpus_must_be_usable():
    assert assigned_device([]) == "cpu"
    if torch.cuda.is_available():
        assert assigned_device([0]) == "cuda"
    else:
        with pytest.raises(RuntimeError, match="Ray assigned GPU 0 to this worker, but PyTorch .* cannot use it"):
            assigned_device([0])


def test_kill_point_is_inert_unless_set(monkeypatch):
    monkeypatch.delenv(KILL_WORKER_ENV, raising=False)
    kill_point("example_ct")  # still alive
    monkeypatch.setenv(KILL_WORKER_ENV, "another_scan")
    kill_point("example_ct")


# -------------------------------------------------------------------------------- on a local Ray


@needs_ray
def test_ray_batch_gives_the_local_batch_results_on_real_scans(tmp_path, ray_address, real_scans, tiny_model_manifest,
                                                               capsys):
    model = ["--model", str(tiny_model_manifest), *FP32_ARGS]
    local, clustered = tmp_path / "local", tmp_path / "ray"
    assert main(["batch", str(real_scans), "-o", str(local), "--device", "cpu", *model]) == EXIT_OK
    capsys.readouterr()
    # torch threads as in this process (conftest: 1): CPU results can differ in a voxel between thread counts
    assert main(["batch", str(real_scans), "-o", str(clustered), *model, "--ray", "--cpus-per-worker", "1"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "ray: 1 node, 2 CPUs, 0 GPUs; 2 workers of 1 CPU for 3 scans" in out
    assert out.count("ready on") == 2 and "cpu, 1 thread)" in out
    assert "[3/3]" in out and "\r" not in out and "\x1b[" not in out  # plain lines when not on a terminal
    assert "3 ok, 0 skipped, 0 failed" in out
    assert "3 scans in" in out and "scans/min in all" in out and "per worker" in out
    assert_same_results(local, clustered)
    assert leftovers(clustered) == []

    # a re-run skips every scan without starting a worker, with --ray or without
    assert main(["batch", str(real_scans), "-o", str(clustered), *model, "--ray", "--cpus-per-worker", "1"]) == EXIT_OK
    assert "no worker started" in capsys.readouterr().out
    assert set(statuses(clustered).values()) == {"skipped"}
    assert main(["batch", str(real_scans), "-o", str(clustered), "--device", "cpu", *model]) == EXIT_OK
    assert set(statuses(clustered).values()) == {"skipped"}


@needs_ray
def test_ray_batch_with_the_bundled_model_matches_the_local_batch(tmp_path, ray_address):
    """The bundled model on the real abdominal DICOM series (20 slices of 512 x 512), through the Python
    API both ways."""
    scans = discover(link_folder(tmp_path / "scans", {"dicom": shared_path("example-abdominal-ct", "dicom")})).scans
    model = load_model_package()
    local, clustered = tmp_path / "local", tmp_path / "ray"
    local.mkdir()
    clustered.mkdir()
    writer = functools.partial(segment_and_write_files, model=model, device="cpu", **FP32)
    run_local_batch(scans, local, writer, outputs=expected_outputs(),
                    model={"name": model.name, "version": model.version})
    report = run_ray_batch(scans, clustered, model, cpus_per_worker=1, segment_options=FP32)
    assert [row["status"] for row in report.rows] == ["ok"] and report.processed == 1 and report.pool_size == 1
    assert report.workers[0].device == "cpu" and report.workers[0].threads == 1
    assert_same_results(local, clustered)


@needs_ray
def test_ray_batch_with_flip_tta_matches_the_local_batch_and_redoes_scans_made_without_it(tmp_path, ray_address,
                                                                                          capsys):
    """--flip-tta reaches the Ray workers: the local batch's results, and the resume rule of the local batch."""
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(chest_phantom(shape=(20, 112, 112), spacing=(0.8, 0.8, 2.5), infection_in_right=True).image(),
                    str(scans / "alpha.nii.gz"))
    # HalfBlindNet misses the lung on the image's left half; averaged with the mirror it finds it.
    common = ["--model", str(write_model_package(tmp_path / "model", HalfBlindNet(), "halfblind")), *FP32_ARGS]
    ray_args = ["--ray", "--cpus-per-worker", "1"]
    plain, local, clustered = tmp_path / "plain", tmp_path / "local", tmp_path / "ray"
    assert main(["batch", str(scans), "-o", str(plain), "--device", "cpu", *common]) == EXIT_OK
    assert main(["batch", str(scans), "-o", str(local), "--device", "cpu", *common, "--flip-tta"]) == EXIT_OK
    mirrored = labels(local / "alpha", "alpha")[".labels.nii.gz"]
    assert np.count_nonzero(labels(plain / "alpha", "alpha")[".labels.nii.gz"] != mirrored) > 1000

    assert main(["batch", str(scans), "-o", str(clustered), *common, *ray_args, "--flip-tta"]) == EXIT_OK
    assert_same_results(local, clustered)
    assert json.loads((clustered / "alpha" / "alpha.measurements.json").read_text())["flip_tta"] is True
    capsys.readouterr()
    assert main(["batch", str(scans), "-o", str(clustered), *common, *ray_args, "--flip-tta"]) == EXIT_OK
    assert "no worker started" in capsys.readouterr().out

    redo = tmp_path / "redo"  # outputs made without the flag: a Ray run with it segments the scan again
    shutil.copytree(plain, redo)
    assert main(["batch", str(scans), "-o", str(redo), *common, *ray_args, "--flip-tta"]) == EXIT_OK
    row = read_summary(redo / "summary.csv")["alpha"]
    assert (row["status"], row["note"]) == ("ok", "segmented: previous outputs were made without --flip-tta")
    np.testing.assert_array_equal(labels(redo / "alpha", "alpha")[".labels.nii.gz"], mirrored)
    assert leftovers(redo) == []


@needs_ray
def test_ray_batch_without_the_nodule_check_matches_the_local_batch(tmp_path, ray_address):
    """--no-nodule-check reaches the Ray workers: the phantom's small solid blob stays infection there too."""
    scans = tmp_path / "scans"
    scans.mkdir()
    sitk.WriteImage(chest_phantom(shape=(20, 112, 112), spacing=(1.5, 1.5, 2.5), infection_in_right=True).image(),
                    str(scans / "alpha.nii.gz"))
    common = ["--model", str(write_model_package(tmp_path / "model", lung_and_infection_net(), "lunginf")),
              *FP32_ARGS, "--no-nodule-check"]
    local, clustered = tmp_path / "local", tmp_path / "ray"
    assert main(["batch", str(scans), "-o", str(local), "--device", "cpu", *common]) == EXIT_OK
    assert main(["batch", str(scans), "-o", str(clustered), *common, "--ray", "--cpus-per-worker", "1"]) == EXIT_OK
    assert_same_results(local, clustered)
    record = json.loads((clustered / "alpha" / "alpha.measurements.json").read_text())
    assert record["nodule_check"] is False
    assert record["measurements"]["total"]["infection_ml"] > 5.0
    assert main(["batch", str(scans), "-o", str(clustered), *common, "--ray", "--cpus-per-worker", "1"]) == EXIT_OK
    assert read_summary(clustered / "summary.csv")["alpha"]["status"] == "skipped"
    with_check = [arg for arg in common if arg != "--no-nodule-check"]  # the default: a Ray run redoes the scan
    assert main(["batch", str(scans), "-o", str(clustered), *with_check, "--ray", "--cpus-per-worker", "1"]) == EXIT_OK
    row = read_summary(clustered / "summary.csv")["alpha"]
    assert (row["status"], row["note"]) == ("ok", "segmented: previous outputs were made with --no-nodule-check")
    assert json.loads((clustered / "alpha" / "alpha.measurements.json").read_text())["nodule_check"] is True


@needs_ray
def test_a_worker_killed_once_mid_scan_is_replaced_and_the_scan_retried(tmp_path, ray_address, small_scans,
                                                                       tiny_model_manifest, monkeypatch):
    monkeypatch.setenv(KILL_WORKER_ENV, "example_ct")  # after its outputs are staged, before they are moved in
    monkeypatch.setenv(KILL_WORKER_ONCE_ENV, str(tmp_path / "killed-once"))
    out = tmp_path / "out"  # created by run_ray_batch
    rows = []
    report = run_ray_batch(discover(small_scans).scans, out, load_model_package(tiny_model_manifest), cpus_per_worker=1,
                           segment_options=FP32, on_row=rows.append)
    assert {row["scan"]: row["status"] for row in rows} == {"dicom": "ok", "example_ct": "ok", "same_ct": "ok"}
    assert statuses(out) == {"dicom": "ok", "example_ct": "ok", "same_ct": "ok"}
    retried = read_summary(out / "summary.csv")["example_ct"]
    assert retried["note"].startswith("segmented on try 2; before: worker process (pid ")
    assert "died: " in retried["note"]
    killed_pid = int((tmp_path / "killed-once").read_text())
    assert [worker.pid for worker in report.workers if worker.died] == [killed_pid]
    assert len(report.workers) == 3 and report.processed == 3  # two at the start, one in place of the dead one
    # the retry removed what the killed worker had staged, and wrote the same result as for the same input
    assert leftovers(out) == []
    assert len(visible(out / "example_ct")) == 5
    for suffix, array in labels(out / "same_ct", "same_ct").items():
        np.testing.assert_array_equal(labels(out / "example_ct", "example_ct")[suffix], array)


@needs_ray
def test_a_worker_killed_every_time_ends_failed_with_the_reason_and_the_others_are_done(
        tmp_path, ray_address, small_scans, tiny_model_manifest, monkeypatch, capsys):
    monkeypatch.setenv(KILL_WORKER_ENV, "dicom")
    out = tmp_path / "out"
    command = ["batch", str(small_scans), "-o", str(out), "--model", str(tiny_model_manifest), *FP32_ARGS,
               "--ray", "--cpus-per-worker", "1", "--retries", "1"]
    assert main(command) == EXIT_SCANS_FAILED
    captured = capsys.readouterr()
    rows = read_summary(out / "summary.csv")
    assert {name: row["status"] for name, row in rows.items()} == {"dicom": "failed", "example_ct": "ok",
                                                                    "same_ct": "ok"}
    assert rows["dicom"]["error"].startswith("its worker died on each of 2 tries; last: worker process (pid ")
    assert "failed: dicom: its worker died on each of 2 tries" in captured.err
    worker_lines = [line for line in captured.out.splitlines() if line.startswith("  worker ")]
    assert sum("died: " in line for line in worker_lines) == 2  # the two dead workers
    assert visible(out / "dicom") == {}  # nothing half-written; the last try's staging folder waits for the next run

    monkeypatch.delenv(KILL_WORKER_ENV)
    assert main(command) == EXIT_OK
    assert statuses(out) == {"dicom": "ok", "example_ct": "skipped", "same_ct": "skipped"}
    assert leftovers(out) == []


@needs_ray
def test_ray_driver_killed_then_resumed(tmp_path, ray_address, small_scans, tiny_model_manifest):
    """kill -9 of a driver (a child process reaching the cluster through $RAY_ADDRESS) once the first
    row is in the summary, its workers still busy; then the same command resumes."""
    out = tmp_path / "out"
    arguments = ["batch", small_scans, "-o", out, "--model", tiny_model_manifest, *FP32_ARGS, "--ray",
                 "--cpus-per-worker", "1", "-q"]
    os.environ["RAY_ADDRESS"] = ray_address
    try:
        driver = start_paused([sys.executable, "-m", "CovidInfectionSegLib.cli", *map(str, arguments)], "ray-row",
                              tmp_path / "paused")
    finally:
        del os.environ["RAY_ADDRESS"]
    first = read_summary(out / "summary.csv")
    assert len(first) == 1 and {row["status"] for row in first.values()} == {"ok"}
    kill_9(driver)  # Ray stops the dead driver's workers, wherever they were

    assert main(list(map(str, arguments))) == EXIT_OK
    rows = read_summary(out / "summary.csv")
    assert rows[next(iter(first))]["status"] == "skipped"
    assert {row["status"] for row in rows.values()} <= {"ok", "skipped"} and len(rows) == 3
    assert all(len(visible(out / name)) == 5 for name in rows)
    assert leftovers(out) == []


@needs_ray
def test_ray_batch_cancelled_stops_its_workers_at_once(tmp_path, ray_address, small_scans, tiny_model_manifest):
    """Ctrl-C (the cancel flag) once the first scan is done: the summary keeps that row, the workers are
    stopped (their CPUs come back), and no scan is half-written. Resuming is as after a kill -9
    (test_ray_driver_killed_then_resumed)."""
    out = tmp_path / "out"
    out.mkdir()
    rows = []
    with pytest.raises(SegmentationCancelled):
        run_ray_batch(discover(small_scans).scans, out, load_model_package(tiny_model_manifest), cpus_per_worker=1,
                      segment_options=FP32, on_row=rows.append, cancel=lambda: bool(rows))
    assert len(rows) == 1 and list(statuses(out).values()) == ["ok"]
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == 2
    assert all(len(visible(folder)) in (0, 5) for folder in out.iterdir() if folder.is_dir())


@needs_ray
def test_a_worker_that_cannot_load_the_model_stops_the_batch_with_exit_3(tmp_path, ray_address, small_scans,
                                                                         tiny_model_manifest, monkeypatch, capsys):
    """The model file the workers read is not the one the driver checked (another file on a node)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for file in tiny_model_manifest.parent.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    from CovidInfectionSegLib import cli

    def load_then_change(path):
        model = load_model_package(path)
        weights = model.weights_path
        weights.write_bytes(weights.read_bytes() + b"\0")
        return model

    monkeypatch.setattr(cli, "load_model_package", load_then_change)
    out = tmp_path / "out"
    code = main(["batch", str(small_scans), "-o", str(out), "--model", str(folder / tiny_model_manifest.name),
                 "--ray", "--cpus-per-worker", "1", "-q"])
    assert code == EXIT_MODEL
    err = capsys.readouterr().err
    assert "model: worker " in err and "checksum mismatch" in err and "Traceback" not in err
    assert list(statuses(out).values()) == [] and all(not visible(out / name) for name in ("dicom", "example_ct"))


@needs_ray
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the GPU workers' branch is not run")
def test_gpu_workers_use_cuda(tmp_path, ray_address, small_scans, tiny_model_manifest):
    out = tmp_path / "out"
    out.mkdir()
    report = run_ray_batch(discover(small_scans).scans, out, load_model_package(tiny_model_manifest),
                           cpus_per_worker=1, gpus_per_worker=0.5)
    assert {worker.device for worker in report.workers} == {"cuda"}
    assert {row["status"] for row in report.rows} == {"ok"}
