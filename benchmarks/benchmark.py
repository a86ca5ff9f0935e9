#!/usr/bin/env python
"""Speed and memory of the engine, end to end and per stage, against a lungmask-style baseline.

A synthetic chest phantom (default 512 x 512 x 300, 0.7 x 0.7 x 1.0 mm) is written to a temporary
NIfTI first, so reading is real. Stages, each timed on its own with the engine's functions:

    read         imageio.read_image of the .nii.gz
    preprocess   reorientation + intensity recipe for every slice (preprocessing.preprocess_slices)
    infer        the network over all slices in batches, upsampling and argmax included
    post-process 3D post-processing, measurements, mapping back to the input grid
    write        .seg.nrrd, .nii.gz, CSV, JSON and preview PNG (outputs.write_all)
    end to end   read + pipeline.segment_image + write_all, as the CLI runs it (the pipeline overlaps
                 preprocessing with inference, so it can be faster than the sum of the stages)

The baseline is a lungmask-style pipeline (Hofmanninger et al. 2020): a 2D U-Net with 64 base
channels and 5 resolution levels (lungmask's ``UNet(depth=5, wf=6)``, 31 M parameters; in this
project's ``UNet2D`` that is ``depth=4``, which counts poolings), random weights, 256 x 256 slices,
batch 20. Only its network differs: it shares our read, preprocess, post-process and write times,
so the end-to-end ratio isolates the network's cost.

Peak memory: the resident set's high-water mark (Linux VmHWM, reset before each stage; the whole-run
figure from ``resource.getrusage``), and ``torch.cuda.max_memory_allocated`` on CUDA.

    python benchmarks/benchmark.py                     # full size, bundled model, device auto
    python benchmarks/benchmark.py --slices 16 --model path/to/model.json --device cpu
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.imageio import from_canonical, read_image, to_canonical
from CovidInfectionSegLib.inference import auto_batch_size, pick_device, predict_slices
from CovidInfectionSegLib.measurements import measure
from CovidInfectionSegLib.model_package import ModelError, ModelPackage, default_model_path, load_model_package
from CovidInfectionSegLib.outputs import write_all
from CovidInfectionSegLib.pipeline import segment_image
from CovidInfectionSegLib.postprocessing import postprocess
from CovidInfectionSegLib.preprocessing import SliceGeometry, preprocess_slices
from CovidInfectionSegLib.sample_data import synthetic_chest

BASELINE_BATCH = 20
BASELINE_SIZE = 256


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
    return whole_run_peak_rss_mb()


def whole_run_peak_rss_mb() -> float:
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


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


def classify_all(module: torch.nn.Module, images: np.ndarray, geometry: SliceGeometry, device: torch.device,
                 batch_size: int) -> np.ndarray:
    """The network over preprocessed uint8 slices in batches -> classes on the slice grid."""
    return np.concatenate([
        predict_slices(module, images[start : start + batch_size], geometry, device)
        for start in range(0, len(images), batch_size)
    ])


def baseline_network(device: torch.device) -> torch.nn.Module:
    """lungmask-style U-Net (64 base channels, 5 levels), random weights."""
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "training"))
    from covidseg_training.unet import UNet2D

    torch.manual_seed(0)
    return UNet2D(in_channels=1, num_classes=3, base_channels=64, depth=4).eval().to(device)


def format_table(rows: list[Row]) -> str:
    header = f"{'stage':<30} {'seconds':>9} {'slices/s':>9} {'peak RSS MB':>12} {'peak CUDA MB':>13}  note"
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = f"{row.slices_per_second:9.1f}" if row.slices_per_second else f"{'':>9}"
        cuda = f"{row.peak_cuda_mb:13.0f}" if row.peak_cuda_mb is not None else f"{'':>13}"
        rss = f"{row.peak_rss_mb:12.0f}" if row.peak_rss_mb is not None else f"{'':>12}"
        lines.append(f"{row.stage:<30} {row.seconds:9.2f} {rate} {rss} {cuda}  {row.note}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--slices", type=int, default=300, help="axial slices of the phantom (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the phantom (default 512)")
    parser.add_argument("--model", help="model manifest or .pt (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=None, help="our batch size (default: the engine's choice)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the lungmask-style baseline")
    return parser.parse_args(argv)


def time_stages(nifti: Path, model: ModelPackage, device: torch.device, batch_size: int, folder: Path,
                slices: int) -> tuple[list[Row], np.ndarray]:
    """Rows for read, preprocess, infer, post-process and write; also the preprocessed slices."""
    rows = []
    image, row = timed("read (.nii.gz)", device, lambda: read_image(nifti))
    rows.append(row)
    canonical = sitk.Cast(to_canonical(image), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(canonical)
    images, row = timed("preprocess", device, lambda: preprocess_slices(volume, model.recipe), slices)
    rows.append(row)
    geometry = SliceGeometry.for_shape(volume.shape[1:], model.recipe.pad_to_square)
    module = model.module.to(device)
    classes, row = timed("infer (ours)", device, lambda: classify_all(module, images, geometry, device, batch_size),
                         slices, f"batch {batch_size}")
    rows.append(row)

    def post() -> sitk.Image:
        lungs = postprocess(classes, volume, canonical.GetSpacing(), lung_class=model.label_value("lung"),
                            infection_class=model.label_value("infection"), intensities_in_hu=True)
        measure(lungs.side, lungs.labels == 3, canonical.GetSpacing())
        labels = sitk.GetImageFromArray(lungs.labels)
        labels.CopyInformation(canonical)
        return from_canonical(labels, image)

    _labels, row = timed("post-process", device, post)
    rows.append(row)
    result = segment_image(image, model, device=str(device), batch_size=batch_size)
    _paths, row = timed("write (all outputs)", device, lambda: write_all(result, image, folder / "write", "bench"))
    rows.append(row)
    return rows, images


def time_end_to_end(nifti: Path, model: ModelPackage, device: torch.device, batch_size: int, folder: Path,
                    slices: int) -> Row:
    """The job as the CLI runs it: read + segment_image + write_all."""
    def end_to_end() -> None:
        scan = read_image(nifti)
        outcome = segment_image(scan, model, device=str(device), batch_size=batch_size)
        write_all(outcome, scan, folder / "e2e", "bench")

    return timed("end to end (ours)", device, end_to_end, slices, "read + segment_image + write_all")[1]


def time_baseline(images: np.ndarray, shape: tuple[int, int], device: torch.device, shared_seconds: float) -> list[Row]:
    """The lungmask-style network over the same slices, and its end-to-end estimate."""
    baseline = baseline_network(device)
    geometry = SliceGeometry.for_shape(shape, True)
    inputs = cv2_resize_stack(images, BASELINE_SIZE)
    classify_all(baseline, inputs[:BASELINE_BATCH], geometry, device, BASELINE_BATCH)  # warm-up
    _classes, row = timed("infer (lungmask-style)", device,
                          lambda: classify_all(baseline, inputs, geometry, device, BASELINE_BATCH),
                          len(images), f"U-Net 64ch 5 levels, {BASELINE_SIZE}px, batch {BASELINE_BATCH}")
    total = shared_seconds + row.seconds
    return [row, Row("end to end (lungmask-style)", total, len(images) / total,
                     note="our read/preprocess/post/write + its network")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    model_path = Path(args.model) if args.model else default_model_path()
    try:
        model = load_model_package(model_path)
    except ModelError as error:
        print(f"benchmark: {error}\n(pass --model path/to/model.json)", file=sys.stderr)
        return 3
    batch_size = args.batch_size or auto_batch_size(device, model.input_size)
    spacing = (0.7, 0.7, 1.0)
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device} ({processor}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"model {model.describe()}, batch size {batch_size}")
    print(f"volume {args.size} x {args.size} x {args.slices} synthetic phantom, spacing {spacing} mm")

    with tempfile.TemporaryDirectory(prefix="covidseg-bench-") as temporary:
        folder = Path(temporary)
        nifti = folder / "phantom.nii.gz"
        sitk.WriteImage(synthetic_chest(size=(args.size, args.size, args.slices), spacing=spacing), str(nifti),
                        useCompression=True)
        # Warm-up (TorchScript optimisation passes, CUDA context, cuDNN autotuning): not timed.
        warm = np.zeros((min(batch_size, args.slices), model.input_size, model.input_size), np.uint8)
        geometry = SliceGeometry.for_shape((args.size, args.size), model.recipe.pad_to_square)
        classify_all(model.module.to(device), warm, geometry, device, batch_size)

        rows, images = time_stages(nifti, model, device, batch_size, folder, args.slices)
        ours_infer = rows[2].seconds
        rows.append(time_end_to_end(nifti, model, device, batch_size, folder, args.slices))
        ours_total = rows[-1].seconds
        if not args.no_baseline:
            shared = sum(row.seconds for row in rows[:5] if not row.stage.startswith("infer"))
            rows += time_baseline(images, (args.size, args.size), device, shared)

    print()
    print(format_table(rows))
    print()
    print(f"peak RSS over the whole run (resource.getrusage): {whole_run_peak_rss_mb():.0f} MB")
    if not args.no_baseline:
        print(f"ours / lungmask-style, network only: {ours_infer / rows[-2].seconds:.2f}x the time")
        print(f"ours / lungmask-style, end to end:   {ours_total / rows[-1].seconds:.2f}x the time")
    return 0


def cv2_resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 slices to size x size (the baseline's input size)."""
    import cv2

    if images.shape[1:] == (size, size):
        return images
    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA) for image in images])


if __name__ == "__main__":
    sys.exit(main())
