"""training/gpu/run_v2.sh, the script a GPU call runs, as a real child process on the CPU: tiny runs of five
folds and an all-data model side by side, the five folds' aggregate, the results archive and the kept
checkpoints in size-limited tar files (float16 copies where one is over the limit), and a second call that
skips what is finished."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest
import torch

from gpu_scripts import FILE_LIMIT_KIB, KEPT, run_gpu_script

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="run_v2.sh needs bash and coreutils' timeout")


def test_every_run_ends_and_the_script_succeeds(gpu_run):
    result = gpu_run["result"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "runs ended after" in result.stdout and "(status 0)" in result.stdout


def test_the_five_folds_are_aggregated_again_over_all_five(gpu_run):
    summary = json.loads((gpu_run["runs"] / "tiny" / "crossval" / "summary.json").read_text(encoding="utf-8"))
    # each fold's own crossval left a one-fold aggregate; the script's second pass counts all five
    assert summary["over_folds"]["infection_dice"]["n"] == 5


def test_the_results_archive_holds_tables_and_logs_but_no_weights(gpu_run):
    with tarfile.open(gpu_run["out"] / "results.tar.gz") as archive:
        names = set(archive.getnames())
    for fold in range(5):
        assert f"./tiny/fold{fold}/eval/summary.json" in names
        assert f"./tiny/fold{fold}/history.json" in names
    assert "./tiny/crossval/summary.json" in names
    assert "./tiny_all/all/history.json" in names
    assert "./logs/tiny-fold0.log" in names and "./logs/tiny_all.log" in names
    assert not [name for name in names if name.endswith((".pt", ".npz")) or "/cache" in name or "gpu-out" in name]


def test_kept_checkpoints_travel_as_float16_copies_in_tar_files_under_the_limit(gpu_run):
    runs, limit = gpu_run["runs"], FILE_LIMIT_KIB * 1024
    members = {}
    for part in sorted(gpu_run["out"].glob("checkpoints-*.tar")):
        with tarfile.open(part) as archive:
            files = [member for member in archive.getmembers() if member.isfile()]
            assert len(files) == 1 or sum(member.size for member in files) <= limit, part.name
            for member in files:
                members[member.name] = archive.extractfile(member).read()
    assert sorted(members) == [f"{run}/best.pt" for run in KEPT]
    for run in KEPT:
        original = runs / run / "best.float32.pt"
        assert original.stat().st_size > limit  # why it went as a copy
        copy = torch.load(runs / run / "best.pt", map_location="cpu", weights_only=False)
        assert copy["record"]["weights"] == "float16 copy of best.pt"
        assert members[f"{run}/best.pt"] == (runs / run / "best.pt").read_bytes()
        weights = [value for value in copy["model"].values() if value.is_floating_point()]
        assert weights and all(value.dtype == torch.float16 for value in weights)
        full = torch.load(original, map_location="cpu", weights_only=False)["model"]
        for name, value in copy["model"].items():
            if value.is_floating_point():
                torch.testing.assert_close(value.float(), full[name], rtol=2 ** -10, atol=1e-4)


def test_a_second_call_skips_the_finished_runs(gpu_run, tmp_path):
    folds = [gpu_run["runs"] / "tiny" / f"fold{fold}" for fold in range(5)]
    before = {path: path.read_bytes() for fold in folds
              for path in (fold / "eval" / "summary.json", fold / "best.pt", fold / "best.float32.pt")}
    all_data = gpu_run["runs"] / "tiny_all" / "all" / "history.json"
    before[all_data] = all_data.read_bytes()
    result = run_gpu_script(gpu_run["training"], tmp_path / "again")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for fold in range(5):
        log = (gpu_run["runs"] / "logs" / f"tiny-fold{fold}.log").read_text(encoding="utf-8")
        assert "finished before" in log and "training into" not in log
    assert {path: path.read_bytes() for path in before} == before  # nothing retrained, the originals kept
    assert (tmp_path / "again" / "results.tar.gz").is_file()
    assert len(list((tmp_path / "again").glob("checkpoints-*.tar"))) == len(KEPT)  # the copies go again
