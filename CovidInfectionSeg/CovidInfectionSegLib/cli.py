"""The ``covidseg`` command: ``segment`` one scan, ``batch`` a folder of scans, ``info`` on model and device.

Exit codes: 0 success; 1 some scans failed (batch); 2 bad input or usage; 3 model error; 130 cancelled
(Ctrl-C). The first Ctrl-C stops after the slice batch in flight, a second one stops at once; files
are written atomically either way, so nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import SimpleITK as sitk
from tqdm import tqdm

from .atomic import write_text_atomic
from .imageio import FILE_SUFFIXES, SUPPORTED_TEXT, read_image
from .inference import PRECISIONS, SegmentationCancelled, pick_device, pick_precision
from .measurements import REGIONS, Measurements
from .model_package import ModelError, ModelPackage, default_model_path, load_model_package
from .outputs import OutputError, ensure_output_dir, measurement_lines, output_paths, outputs_complete, write_all
from .pipeline import segment_image
from .sample_data import load_default_input
from .validation import InputError

EXIT_OK = 0
EXIT_SCANS_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_CANCELLED = 130

SUMMARY_FILE = "summary.csv"
MEASUREMENT_FIELDS = ("lung_ml", "infection_ml", "percent_infected", "grade")
SUMMARY_COLUMNS = (
    "scan", "status", "error",
    *(f"{region}_{field}" for region in REGIONS for field in MEASUREMENT_FIELDS),
    "seconds", "warnings",
)


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


@dataclass
class Options:
    """What ``segment`` and ``batch`` share."""

    device: str
    batch_size: int | None
    preview: bool
    precision: str
    quiet: bool


@dataclass(frozen=True)
class Scan:
    """One scan found by ``batch``: a file or a DICOM series folder, and its output name."""

    path: Path
    name: str  # relative to the input folder, without the image suffix; also the output sub-folder

    @property
    def stem(self) -> str:
        return Path(self.name).name


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (also used by tests, in-process)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # argparse exits 2 on bad usage, 0 for --help
        return int(exit_request.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except UsageError as error:
        _error(str(error))
        return EXIT_USAGE
    except OutputError as error:
        _error(str(error))
        return EXIT_USAGE
    except ModelError as error:
        _error(f"model: {error}")
        return EXIT_MODEL
    except (SegmentationCancelled, KeyboardInterrupt):
        _error("cancelled")
        return EXIT_CANCELLED


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands segment, batch, info)."""
    parser = argparse.ArgumentParser(
        prog="covidseg",
        description="Segment lungs and COVID-19 infection in chest CT; research use only, not for diagnosis.",
        epilog="Exit codes: 0 success, 1 some scans failed (batch), 2 bad input or usage, 3 model error, 130 cancelled.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{segment,batch,info}")

    run_options = argparse.ArgumentParser(add_help=False)
    run_options.add_argument("--model", help="model manifest (.json) or TorchScript file (.pt); default: the bundled model "
                             f"({default_model_path()}) or $COVIDSEG_MODEL")
    run_options.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    run_options.add_argument("--batch-size", type=positive_integer, default=None,
                             help="slices per network batch (default: 2 on CPU, from free memory on CUDA)")
    run_options.add_argument("--precision", choices=PRECISIONS, default="auto",
                             help="network arithmetic: auto (bf16 on a CPU with native bf16, fp16 on CUDA, else fp32), "
                             "or force fp32, bf16 or fp16 (CUDA only) (default auto)")
    run_options.add_argument("--preview", action=argparse.BooleanOptionalAction, default=True,
                             help="write a PNG montage of axial slices with the segments (default on)")
    run_options.add_argument("-q", "--quiet", action="store_true", help="no progress bars or informational output")

    segment = commands.add_parser("segment", parents=[run_options], help="segment one scan",
                                  description="Segment one CT scan. Without INPUT, runs on 3D Slicer's CTChest sample "
                                  "(downloaded once), or on a synthetic phantom when offline (said plainly).")
    segment.add_argument("input", nargs="?", type=Path, help=f"CT file or DICOM folder: {SUPPORTED_TEXT}")
    segment.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if needed)")
    segment.set_defaults(handler=run_segment)

    batch = commands.add_parser("batch", parents=[run_options], help="segment every scan in a folder",
                                description="Segment every scan under INPUT_DIR (image files and DICOM series "
                                "folders), one output folder per scan, and a summary.csv updated as it goes. "
                                "Scans whose outputs are complete are skipped unless --overwrite.")
    batch.add_argument("input_dir", type=Path, help="folder of scans")
    batch.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if needed)")
    batch.add_argument("--overwrite", action="store_true", help="redo scans whose outputs already exist")
    batch.set_defaults(handler=run_batch)

    info = commands.add_parser("info", help="show the model and the compute device")
    info.add_argument("--model", help="model manifest (.json) or TorchScript file (.pt); default: the bundled model")
    info.add_argument("--device", default="auto", help="device to report on (default auto)")
    info.set_defaults(handler=run_info)
    return parser


def positive_integer(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _options(args: argparse.Namespace) -> Options:
    return Options(device=args.device, batch_size=args.batch_size, preview=args.preview, quiet=args.quiet,
                   precision=args.precision)


def _check_device(device: str, precision: str = "auto") -> None:
    try:
        torch_device = pick_device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device: {error}") from error
    try:
        pick_precision(precision, torch_device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--precision: {error}") from error


def _prepare_output(folder: Path) -> Path:
    try:
        return ensure_output_dir(folder)
    except OutputError as error:
        raise UsageError(str(error)) from error


# ----------------------------------------------------------------------------------------- segment


def run_segment(args: argparse.Namespace) -> int:
    """``covidseg segment``: one scan (or the default input) -> outputs in ``args.output``."""
    options = _options(args)
    outdir = _prepare_output(args.output)
    _check_device(options.device, options.precision)
    model = load_model_package(args.model)
    warnings: list[str] = []
    if args.input is None:
        default = load_default_input()
        image, source = default.image, default.description
        stem = "synthetic-chest" if default.is_synthetic else "CT-chest"
    else:
        image = _read(args.input, warnings)
        source, stem = str(args.input), scan_stem(args.input)
    _say(options, f"input: {source}\nmodel: {model.describe()}")
    with cancel_on_sigint(options.quiet) as cancel:
        result, paths = _segment_and_write(image, model, outdir, stem, source, options, cancel, warnings)
    for warning in result.warnings:
        _error(f"warning: {warning}")
    _say(options, "\n".join(measurement_lines(result.measurements)))
    _say(options, "wrote:\n" + "\n".join(f"  {path}" for path in paths.values()))
    return EXIT_OK


def _read(path: Path, warnings: list[str]) -> sitk.Image:
    try:
        return read_image(path, warnings)
    except InputError as error:
        raise UsageError(str(error)) from error


def _segment_and_write(
    image: sitk.Image, model: ModelPackage, outdir: Path, stem: str, source: str,
    options: Options, cancel: threading.Event, read_warnings: list[str],
) -> tuple[Any, dict[str, Path]]:
    """Segment ``image`` with a progress bar and write every output; InputError -> UsageError."""
    with tqdm(total=None, desc=f"segmenting {stem}", unit="slice", disable=options.quiet, leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = segment_image(image, model, device=options.device, batch_size=options.batch_size,
                                   progress=progress, cancel=cancel, name=source, precision=options.precision)
        except InputError as error:
            raise UsageError(str(error)) from error
    result.warnings[:0] = read_warnings
    result.source = source
    try:
        paths = write_all(result, image, outdir, stem, preview=options.preview)
    except OSError as error:  # disk full, permissions changed under us, ...
        raise OutputError(f"cannot write the outputs to {outdir}: {error}") from error
    return result, paths


def scan_stem(path: Path) -> str:
    """Output name for an input: the file name without its image suffix, or the folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.resolve().name
    if path.suffix.lower() == ".dcm":
        return path.resolve().parent.name
    name = path.name
    for suffix in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ------------------------------------------------------------------------------------------- batch


def run_batch(args: argparse.Namespace) -> int:
    """``covidseg batch``: every scan under ``args.input_dir``; summary.csv in ``args.output``."""
    options = _options(args)
    input_dir: Path = args.input_dir
    if not input_dir.is_dir():
        raise UsageError(f"{input_dir}: not a folder (batch needs a folder of scans; use 'segment' for one file)")
    outdir = _prepare_output(args.output)
    _check_device(options.device, options.precision)
    scans = find_scans(input_dir, exclude=outdir)
    if not scans:
        raise UsageError(f"{input_dir}: no scans found ({SUPPORTED_TEXT})")
    model = load_model_package(args.model)
    _say(options, f"{len(scans)} scans in {input_dir}; model: {model.describe()}")
    summary_path = outdir / SUMMARY_FILE
    rows: list[dict[str, Any]] = []
    with cancel_on_sigint(options.quiet) as cancel:
        try:
            for scan in tqdm(scans, desc="scans", unit="scan", disable=options.quiet):
                if cancel.is_set():
                    raise SegmentationCancelled("cancelled between scans")
                rows.append(_batch_one(scan, model, outdir, options, args.overwrite, cancel))
                write_summary(summary_path, rows)
        except (SegmentationCancelled, KeyboardInterrupt):
            write_summary(summary_path, rows)
            _error(f"cancelled after {len(rows)} of {len(scans)} scans; summary so far: {summary_path}")
            return EXIT_CANCELLED
    failed = [row for row in rows if row["status"] == "failed"]
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed")}
    _say(options, f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; summary: {summary_path}")
    for row in failed:
        _error(f"failed: {row['scan']}: {row['error']}")
    return EXIT_SCANS_FAILED if failed else EXIT_OK


def _batch_one(
    scan: Scan, model: ModelPackage, outdir: Path, options: Options, overwrite: bool, cancel: threading.Event
) -> dict[str, Any]:
    """Segment one scan of a batch; a failure becomes a 'failed' row. Cancelling and model errors
    (not the scan's fault) propagate."""
    scan_dir = outdir / scan.name
    if not overwrite and outputs_complete(scan_dir, scan.stem, options.preview):
        return _skipped_row(scan, scan_dir)
    started = time.perf_counter()
    warnings: list[str] = []
    try:
        image = read_image(scan.path, warnings)
        result, _paths = _segment_and_write(image, model, scan_dir, scan.stem, str(scan.path), options, cancel, warnings)
    except (SegmentationCancelled, KeyboardInterrupt):
        raise
    except (UsageError, InputError, OutputError, RuntimeError, OSError, ValueError) as error:
        return {"scan": scan.name, "status": "failed", "error": str(error),
                "seconds": round(time.perf_counter() - started, 2)}
    return {
        "scan": scan.name, "status": "ok", "error": "",
        **measurement_columns(result.measurements),
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": " | ".join(result.warnings),
    }


def _skipped_row(scan: Scan, scan_dir: Path) -> dict[str, Any]:
    """A row for a scan whose outputs exist: its measurements are read back from them."""
    row: dict[str, Any] = {"scan": scan.name, "status": "skipped", "error": "outputs already complete (--overwrite redoes)"}
    record_path = output_paths(scan_dir, scan.stem)["measurements_json"]
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        row.update(measurement_columns(Measurements.from_dict(record["measurements"])))
        row["warnings"] = " | ".join(record.get("warnings", []))
    except (OSError, ValueError, KeyError, TypeError) as error:
        row["error"] += f"; previous measurements unreadable: {error}"
    return row


def measurement_columns(measurements: Measurements) -> dict[str, Any]:
    """Flat summary columns ``<region>_<field>`` (e.g. ``total_percent_infected``)."""
    columns = {}
    for region in REGIONS:
        values = measurements.region(region).to_dict()
        columns.update({f"{region}_{field}": values[field] for field in MEASUREMENT_FIELDS})
    return columns


def write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the batch summary CSV (one row per scan so far) atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def find_scans(folder: Path, exclude: Path | None = None) -> list[Scan]:
    """Image files with a supported suffix and DICOM series folders under ``folder`` (recursively).

    Hidden entries and ``exclude`` (the output folder, when it lies inside the input) are skipped.
    """
    folder = Path(folder)
    excluded = exclude.resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (root_path / d).resolve() != excluded)
        visible = sorted(f for f in files if not f.startswith("."))
        images = [f for f in visible if f.lower().endswith(FILE_SUFFIXES)]
        for name in images:
            relative = (root_path / name).relative_to(folder)
            found.append((root_path / name, str(relative.with_name(scan_stem(root_path / name)).as_posix())))
        others = [f for f in visible if f not in images]
        if others and _has_dicom_series(root_path):
            relative = root_path.relative_to(folder)
            found.append((root_path, relative.as_posix() if relative.parts else root_path.resolve().name))
    names = [name for _path, name in found]
    return [
        # Two inputs with the same stem (a.nii.gz and a.nrrd) keep their full file names apart.
        Scan(path, path.relative_to(folder).as_posix() if names.count(name) > 1 and path.is_file() else name)
        for path, name in found
    ]


def _has_dicom_series(folder: Path) -> bool:
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


# -------------------------------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    """``covidseg info``: the device, then the model manifest summary."""
    import torch

    print(f"torch:     {torch.__version__}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count()))
        print(f"CUDA:      available (CUDA {torch.version.cuda}); GPU: {names}")
    else:
        build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU visible"
        print(f"CUDA:      not available ({build})")
    try:
        device = pick_device(args.device)
        print(f"device:    {args.device} -> {device}; precision auto -> {pick_precision('auto', device)}")
    except (RuntimeError, ValueError) as error:
        print(f"device:    {args.device} -> unusable: {error}")
    model = load_model_package(args.model)
    for line in describe_model(model):
        print(line)
    return EXIT_OK


def describe_model(model: ModelPackage) -> list[str]:
    """Lines summarising a model package's manifest for ``covidseg info``."""
    manifest = model.manifest
    architecture = manifest.get("architecture", {})
    metrics = manifest.get("metrics") or {}
    return [
        f"model:     {model.name} {model.version}",
        f"manifest:  {model.manifest_path}",
        f"weights:   {model.weights_path}",
        f"sha256:    {manifest['sha256']}",
        "network:   " + ", ".join(f"{key} {value}" for key, value in architecture.items()),
        "labels:    " + ", ".join(f"{value} {name}" for value, name in sorted(model.labels.items())),
        "segments:  " + ", ".join(f"{segment.value} {segment.name}" for segment in model.segments),
        "metrics:   " + (json.dumps(metrics, sort_keys=True) if metrics else "none recorded"),
        f"licence:   {manifest.get('licence', 'not stated')}",
    ]


# ----------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def cancel_on_sigint(quiet: bool = False) -> Iterator[threading.Event]:
    """Yield an Event that the first Ctrl-C sets (work stops at the next batch); a second Ctrl-C
    raises KeyboardInterrupt at once. Outside the main thread, Ctrl-C keeps its default behaviour."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        if not quiet:
            _error("stopping after the current batch of slices (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def _say(options: Options, text: str) -> None:
    if not options.quiet:
        print(text)


def _error(text: str) -> None:
    print(f"covidseg: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
