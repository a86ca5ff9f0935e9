#!/usr/bin/env python
"""Speed and memory of the engine, end to end and per stage, against the real lungmask on the same volume.

A synthetic chest phantom (default 512 x 512 x 300, 0.7 x 0.7 x 1.0 mm, int16 HU) is written to a
temporary NIfTI, so reading is real. Measured, in this order:

    start-up      process start -> first batch of slices out of the network (benchmarks/startup.py, own
                  process: import, model load, read, preprocessing, network)
    end to end    ``covidseg segment`` on the NIfTI in its own process, process start -> every output
                  written; its peak RSS (the child's high-water mark, from wait4) against the memory target
    stages        in this process, each timed on its own with the engine's functions (after a warm-up):
                  read, preprocess, network (slices/s), post-process (the pipeline's own timing of it:
                  clean-up, measurements, largest lesion, back to the input grid), write (.seg.nrrd,
                  .nii.gz, CSV, JSON, preview PNG)
    lungmask      the real lungmask (``pip install -e ".[benchmark]"``), its R231 U-Net with random weights
                  (benchmarks/run_lungmask.py), through its own ``LMInferer.apply``, in its own process:
                  process start -> mask written, and ``apply`` alone; ours as a ratio of its time

Peak memory of the stages: the resident set's high-water mark (Linux VmHWM, reset before each stage),
and ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/benchmark.py --device cpu                 # the README's figures
    python benchmarks/benchmark.py --device cuda
    python benchmarks/benchmark.py --slices 1000 --no-lungmask  # the memory target for a long scan
    python benchmarks/benchmark.py --slices 32 --sweep-batch 1,2,4,8 --no-lungmask
    python benchmarks/benchmark.py --slices 64 --flip-tta --no-lungmask  # the cost of flip TTA
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.imageio import read_image, to_canonical
from CovidInfectionSegLib.inference import (
    auto_batch_size,
    cpu_has_native_bf16,
    cpu_name,
    pick_device,
    pick_precision,
    predict_slices,
    prepare_module,
)
from CovidInfectionSegLib.model_package import ModelError, ModelPackage, default_model_path, load_model_package
from CovidInfectionSegLib.outputs import write_all
from CovidInfectionSegLib.pipeline import segment_image
from CovidInfectionSegLib.preprocessing import SliceGeometry, preprocess_slices
from CovidInfectionSegLib.sample_data import synthetic_chest

HERE = Path(__file__).resolve().parent
SPACING = (0.7, 0.7, 1.0)
MEMORY_BASE_BYTES = 1.5e9  # the memory target: 1.5 GB for 512 x 512 x 300 ...
MEMORY_TARGET_SLICES = 300  # ... and 1.5 GB + twice the int16 volume beyond that


@dataclass
class Row:
    stage: str
    seconds: float
    slices_per_second: float | None = None
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    note: str = ""


def reset_peaks(device: torch.device) -> None:
    """Reset the RSS high-water mark (Linux: write 5 to clear_refs) and CUDA's peak counter."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not allowed: peaks become whole-run figures
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (VmHWM), else for the whole run (getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return rusage_mb(resource.getrusage(resource.RUSAGE_SELF))


def rusage_mb(usage: Any) -> float:
    """``ru_maxrss`` in MB (bytes on macOS, KiB on Linux)."""
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return usage.ru_maxrss / scale


def timed(stage: str, device: torch.device, work: Callable[[], Any], slices: int | None = None, note: str = "") -> tuple[Any, Row]:
    """Run ``work`` once with synchronised timing and peak memory; return (its result, a table row)."""
    reset_peaks(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    value = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    row = Row(
        stage, seconds,
        slices_per_second=slices / seconds if slices else None,
        peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        note=note,
    )
    return value, row


def run_child(command: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``command`` in its own process; (wall seconds from start to exit, its peak RSS in MB, stdout).
    Raises RuntimeError with the end of its output when it fails."""
    with open(log, "w", encoding="utf-8") as output:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        _pid, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text(encoding="utf-8")
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {child.returncode}:\n{text[-2000:]}")
    own = [json.loads(line)["own_peak_rss_mb"] for line in text.splitlines() if line.startswith('{"own_peak_rss_mb"')]
    return seconds, own[-1] if own else rusage_mb(usage), text


def own_process(command: list[str]) -> list[str]:
    """``command`` (``python -m ...`` or ``python script ...``) run through ``own_peak.py``, so that its
    peak memory is its own (see that file for why the parent's rusage is not)."""
    return [command[0], str(HERE / "own_peak.py"), *command[1:]]


def last_json(text: str) -> dict[str, Any]:
    return json.loads([line for line in text.splitlines()
                       if line.startswith("{") and not line.startswith('{"own_peak_rss_mb"')][-1])


def classify_all(module: torch.nn.Module, images: np.ndarray, geometry: SliceGeometry, device: torch.device,
                 batch_size: int, precision: str, flip_tta: bool = False) -> np.ndarray:
    """The network over preprocessed uint8 slices in batches -> classes on the slice grid."""
    return np.concatenate([
        predict_slices(module, images[start : start + batch_size], geometry, device, precision, flip_tta)
        for start in range(0, len(images), batch_size)
    ])


def format_table(rows: list[Row]) -> str:
    header = f"{'stage':<34} {'seconds':>9} {'slices/s':>9} {'peak RSS MB':>12} {'peak CUDA MB':>13}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = f"{row.slices_per_second:9.1f}" if row.slices_per_second else f"{'':>9}"
        cuda = f"{row.peak_cuda_mb:13.0f}" if row.peak_cuda_mb is not None else f"{'':>13}"
        rss = f"{row.peak_rss_mb:12.0f}" if row.peak_rss_mb is not None else f"{'':>12}"
        lines.append(f"{row.stage:<34} {row.seconds:9.2f} {rate} {rss} {cuda}  {row.note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (default auto)")
    parser.add_argument("--slices", type=int, default=300, help="axial slices of the phantom (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the phantom (default 512)")
    parser.add_argument("--model", help="model manifest or .pt (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=None, help="our batch size (default: the engine's choice)")
    parser.add_argument("--no-lungmask", action="store_true", help="skip the real lungmask")
    parser.add_argument("--sweep-batch", metavar="N,N,...", help="also time the network at these batch sizes")
    parser.add_argument("--flip-tta", action="store_true",
                        help="also time the network with flip test-time augmentation (segment --flip-tta)")
    return parser.parse_args(argv)


def time_stages(nifti: Path, model: ModelPackage, device: torch.device, precision: str, batch_size: int,
                folder: Path, slices: int, flip_tta: bool = False) -> tuple[list[Row], np.ndarray]:
    """Rows for read, preprocess, network, post-process and write; also the preprocessed slices."""
    rows = []
    image, row = timed("read (.nii.gz)", device, lambda: read_image(nifti))
    rows.append(row)
    canonical = to_canonical(image)
    volume = sitk.GetArrayViewFromImage(canonical)
    images, row = timed("preprocess", device, lambda: preprocess_slices(volume, model.recipe), slices)
    rows.append(row)
    geometry = SliceGeometry.for_shape(volume.shape[1:], model.recipe.pad_to_square)
    module = prepare_module(model.module, device, precision)
    classify_all(module, images[: 2 * batch_size], geometry, device, batch_size, precision)  # warm-up
    _classes, row = timed("network (ours)", device,
                          lambda: classify_all(module, images, geometry, device, batch_size, precision),
                          slices, f"{precision}, batch {batch_size}, {torch.get_num_threads()} threads")
    rows.append(row)
    if flip_tta:
        _flipped, row = timed("network (ours, flip TTA)", device,
                              lambda: classify_all(module, images, geometry, device, batch_size, precision, True),
                              slices, f"{precision}, batch {batch_size}, each slice also mirrored")
        rows.append(row)

    # Post-processing as the pipeline runs it (clean-up, measurements, largest lesion, back to the input
    # grid), timed by the pipeline itself rather than restated here.
    result = segment_image(image, model, device=str(device), batch_size=batch_size, precision=precision)
    rows.append(Row("post-process", result.timings["postprocess"], note="segment_image's own timing"))
    _paths, row = timed("write (all outputs)", device, lambda: write_all(result, image, folder / "write", "bench"))
    rows.append(row)
    return rows, images


def time_startup(nifti: Path, args: argparse.Namespace, device: torch.device, folder: Path) -> Row:
    command = [sys.executable, str(HERE / "startup.py"), str(nifti), "--device", str(device),
               "--precision", args.precision] + _model_and_batch(args)
    launched = time.time()
    _seconds, _rss, text = run_child(command, folder / "startup.log")
    moments = last_json(text)
    steps = ", ".join(f"{name} {moments[name] - launched:.2f}" for name in ("imported", "model_loaded", "read"))
    return Row("start-up (process -> first batch)", moments["first_batch"] - launched,
               note=f"own process; s from start: {steps}; first batch {moments['first_batch_slices']} slices")


def time_end_to_end(nifti: Path, args: argparse.Namespace, device: torch.device, folder: Path) -> Row:
    command = [sys.executable, "-m", "CovidInfectionSegLib.cli", "segment", str(nifti), "-o", str(folder / "e2e"),
               "-q", "--device", str(device), "--precision", args.precision] + _model_and_batch(args)
    seconds, rss, _text = run_child(own_process(command), folder / "e2e.log")
    return Row("end to end (covidseg segment)", seconds, args.slices / seconds, rss,
               note="own process: start -> every output written")


def _model_and_batch(args: argparse.Namespace) -> list[str]:
    return (["--model", args.model] if args.model else []) + (
        ["--batch-size", str(args.batch_size)] if args.batch_size else [])


def time_lungmask(nifti: Path, device: torch.device, folder: Path, slices: int) -> list[Row]:
    """The real lungmask, own process, random R231 weights: end to end and ``apply`` alone."""
    weights = folder / "r231-random.pth"
    run_child([sys.executable, str(HERE / "run_lungmask.py"), "--make-weights", str(weights)], folder / "weights.log")
    command = [sys.executable, str(HERE / "run_lungmask.py"), str(nifti), str(weights), str(folder / "lungmask.nii.gz"),
               "--device", "cuda" if device.type == "cuda" else "cpu"]
    seconds, rss, text = run_child(own_process(command), folder / "lungmask.log")
    report = last_json(text)
    return [
        Row("end to end (lungmask)", seconds, slices / seconds, rss,
            note=f"own process, R231 random weights, {report['device']}, {report['threads']} threads, "
                 f"lung {report['lung_fraction']:.0%} of voxels"),
        Row("  of which LMInferer.apply", report["apply_seconds"], slices / report["apply_seconds"],
            note="preprocess + network (batch 20) + its post-processing"),
    ]


def sweep_batch(images: np.ndarray, model: ModelPackage, device: torch.device, precision: str, sizes: list[int],
                shape: tuple[int, int]) -> list[Row]:
    """Network time per batch size on the same slices (for tuning ``CPU_BATCH_SIZE``)."""
    module = prepare_module(model.module, device, precision)
    geometry = SliceGeometry.for_shape(shape, model.recipe.pad_to_square)
    rows = []
    for size in sizes:
        classify_all(module, images[: 2 * size], geometry, device, size, precision)
        _classes, row = timed(f"network, batch {size}", device,
                              lambda: classify_all(module, images, geometry, device, size, precision), len(images))
        rows.append(row)
    return rows


def memory_verdict(peak_mb: float, size: int, slices: int) -> str:
    volume_bytes = size * size * slices * 2
    budget = MEMORY_BASE_BYTES + (2 * volume_bytes if slices > MEMORY_TARGET_SLICES else 0)
    rule = "1.5 GB" if slices <= MEMORY_TARGET_SLICES else f"1.5 GB + 2 x {volume_bytes / 1e6:.0f} MB int16 volume"
    verdict = "within" if peak_mb * 2**20 <= budget else "OVER"
    return f"peak RSS of covidseg segment: {peak_mb:.0f} MB; target {budget / 2**20:.0f} MB ({rule}): {verdict}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device)
    model_path = Path(args.model) if args.model else default_model_path()
    try:
        model = load_model_package(model_path)
    except ModelError as error:
        print(f"benchmark: {error}\n(pass --model path/to/model.json)", file=sys.stderr)
        return 3
    batch_size = args.batch_size or auto_batch_size(device, model.input_size)
    with_lungmask = not args.no_lungmask and importlib.util.find_spec("lungmask") is not None
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({processor}), {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
          f"native bf16: {'yes' if cpu_has_native_bf16() else 'no'}; torch {torch.__version__}")
    print(f"model {model.describe()}; precision {args.precision} -> {precision}, batch size {batch_size}")
    print(f"volume {args.size} x {args.size} x {args.slices} synthetic phantom (int16), spacing {SPACING} mm")
    if not with_lungmask and not args.no_lungmask:
        print('lungmask is not installed (pip install -e ".[benchmark]"): no comparison')

    with tempfile.TemporaryDirectory(prefix="covidseg-bench-") as temporary:
        folder = Path(temporary)
        nifti = folder / "phantom.nii.gz"
        sitk.WriteImage(synthetic_chest(size=(args.size, args.size, args.slices), spacing=SPACING), str(nifti),
                        useCompression=True)
        rows = [time_startup(nifti, args, device, folder), time_end_to_end(nifti, args, device, folder)]
        stages, images = time_stages(nifti, model, device, precision, batch_size, folder, args.slices, args.flip_tta)
        rows += stages
        if with_lungmask:
            rows += time_lungmask(nifti, device, folder, args.slices)
        if args.sweep_batch:
            sizes = [int(size) for size in args.sweep_batch.split(",")]
            rows += sweep_batch(images, model, device, precision, sizes, (args.size, args.size))

    print()
    print(format_table(rows))
    print()
    ours = rows[1]
    print(memory_verdict(ours.peak_rss_mb or 0.0, args.size, args.slices))
    if with_lungmask:
        theirs = next(row for row in rows if row.stage == "end to end (lungmask)")
        print(f"ours / lungmask, end to end: {ours.seconds / theirs.seconds:.3f}x the time "
              f"({theirs.seconds / ours.seconds:.1f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
