"""The ``covidseg`` command: ``segment`` one scan, ``batch`` a folder of scans, ``info`` on model and device.

Argument handling and messages only: reading and segmenting is :func:`pipeline.segment_file`, writing
:func:`outputs.write_all`, and batch discovery, resume, locking and the summary are :mod:`.batch`.

Exit codes: 0 success; 1 some scans failed (batch); 2 bad input or usage; 3 model error; 4 the output
folder is in use (another batch holds it) or ``summary.csv`` cannot be written; 130 cancelled (Ctrl-C).
The first Ctrl-C stops after the slice batch in flight, a second one stops at once; a scan's outputs
are written all or nothing either way, and a previous result stays until the new one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from .atomic import OutputError, OutputLockedError
from .batch import (
    SUMMARY_FILE,
    BatchFolderError,
    Scan,
    SummaryError,
    discover,
    expected_outputs,
    run_local_batch,
    scan_stem,
)
from .imageio import SUPPORTED_TEXT
from .inference import PRECISIONS, ProgressCallback, SegmentationCancelled, pick_device, pick_precision
from .model_package import ModelError, ModelPackage, default_model_path, load_model_package
from .outputs import OutputNotWritableError, ensure_output_dir, write_all, write_files
from .pipeline import SegmentationResult, segment_file, segment_image
from .preview import measurement_lines
from .sample_data import load_default_input
from .validation import InputError

__all__ = [
    "main", "build_parser", "EXIT_OK", "EXIT_SCANS_FAILED", "EXIT_USAGE", "EXIT_MODEL", "EXIT_OUTPUT_IN_USE",
    "EXIT_CANCELLED", "UsageError", "describe_model", "cross_validation_lines", "cancel_on_sigint", "slice_progress",
]

EXIT_OK = 0
EXIT_SCANS_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_OUTPUT_IN_USE = 4
EXIT_CANCELLED = 130
# Plain progress lines (not on a terminal) every this many percent of a scan's slices.
PROGRESS_LINE_PERCENT = 25


class UsageError(Exception):
    """Bad arguments or input: exit code 2."""


@dataclass
class Options:
    """What ``segment`` and ``batch`` share."""

    device: str
    batch_size: int | None
    preview: bool
    quiet: bool
    precision: str = "auto"


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
    except (BatchFolderError, OutputLockedError) as error:
        _error(str(error))
        return EXIT_OUTPUT_IN_USE
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
        epilog="Exit codes: 0 success, 1 some scans failed (batch), 2 bad input or usage, 3 model error, "
        "4 output folder in use by another batch or summary.csv not writable, 130 cancelled.",
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
    run_options.add_argument("-q", "--quiet", action="store_true", help="no progress or informational output")

    segment = commands.add_parser("segment", parents=[run_options], help="segment one scan",
                                  description="Segment one CT scan. Without INPUT, runs on 3D Slicer's CTChest sample "
                                  "(downloaded once), or on a synthetic phantom when offline (said plainly).")
    segment.add_argument("input", nargs="?", type=Path, help=f"CT file or DICOM folder: {SUPPORTED_TEXT}")
    segment.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if needed)")
    segment.set_defaults(handler=run_segment)

    batch = commands.add_parser("batch", parents=[run_options], help="segment every scan in a folder",
                                description="Segment every scan under INPUT_DIR (image files and DICOM series "
                                "folders), one output folder per scan, and a summary.csv updated as it goes. "
                                "Scans whose outputs are complete for the same input and model are skipped "
                                "unless --overwrite; a changed input is segmented again.")
    batch.add_argument("input_dir", type=Path, help="folder of scans")
    batch.add_argument("-o", "--output", required=True, type=Path, help="output folder (created if needed)")
    batch.add_argument("--overwrite", action="store_true", help="redo scans whose outputs already exist")
    batch.set_defaults(handler=run_batch)

    info = commands.add_parser("info", help="show the model and the compute device")
    info.add_argument("--model", help="model manifest (.json) or TorchScript file (.pt); default: the bundled model")
    info.add_argument("--device", default="auto", help="device to report on (default auto)")
    info.add_argument("--json", action="store_true", help="print the model's whole manifest as JSON (nothing else)")
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


# ----------------------------------------------------------------------------------------- segment


def run_segment(args: argparse.Namespace) -> int:
    """``covidseg segment``: one scan (or the default input) -> outputs in ``args.output``."""
    options = _options(args)
    try:
        outdir = ensure_output_dir(args.output)
    except OutputError as error:
        raise UsageError(str(error)) from error
    _check_device(options.device, options.precision)
    model = load_model_package(args.model)
    default = load_default_input() if args.input is None else None
    if default is not None:
        source, stem = default.description, "synthetic-chest" if default.is_synthetic else "CT-chest"
    else:
        source, stem = str(args.input), scan_stem(args.input)
    _say(options, f"input: {source}\nmodel: {model.describe()}")
    with cancel_on_sigint(options.quiet) as cancel:
        with slice_progress(f"segmenting {stem}", options.quiet) as progress:
            run = dict(device=options.device, batch_size=options.batch_size, progress=progress, cancel=cancel,
                       precision=options.precision)
            try:
                if default is not None:
                    result = segment_image(default.image, model, name=source, **run)
                else:
                    result = segment_file(args.input, model, **run)
            except InputError as error:
                raise UsageError(str(error)) from error
        paths = write_all(result, default.image if default is not None else None, outdir, stem, options.preview)
    for warning in result.warnings:
        _error(f"warning: {warning}")
    _say(options, "\n".join(measurement_lines(result.measurements)))
    _say(options, "wrote:\n" + "\n".join(f"  {path}" for path in paths.values()))
    return EXIT_OK


# ------------------------------------------------------------------------------------------- batch


def run_batch(args: argparse.Namespace) -> int:
    """``covidseg batch``: every scan under ``args.input_dir``; summary.csv in ``args.output``."""
    options = _options(args)
    input_dir: Path = args.input_dir
    if not input_dir.is_dir():
        raise UsageError(f"{input_dir}: not a folder (batch needs a folder of scans; use 'segment' for one file)")
    try:
        outdir = ensure_output_dir(args.output)
    except OutputNotWritableError as error:
        raise SummaryError(f"cannot write the batch summary: {error}") from error
    except OutputError as error:
        raise UsageError(str(error)) from error
    _check_device(options.device, options.precision)
    found = discover(input_dir, exclude=outdir)
    if found.ignored_outputs:
        shown = ", ".join(str(path) for path in found.ignored_outputs[:3]) + (", ..." if len(found.ignored_outputs) > 3 else "")
        _say(options, f"left out {len(found.ignored_outputs)} covidseg outputs found under {input_dir}: {shown}")
    scans = found.scans
    if not scans:
        raise UsageError(f"{input_dir}: no scans found ({SUPPORTED_TEXT})")
    model = load_model_package(args.model)
    _say(options, f"{len(scans)} scans in {input_dir}; model: {model.describe()}")
    summary_path = outdir / SUMMARY_FILE
    rows: list[dict[str, Any]] = []
    on_terminal = _on_terminal()
    with cancel_on_sigint(options.quiet) as cancel, \
            tqdm(total=len(scans), desc="scans", unit="scan", disable=options.quiet or not on_terminal) as bar:

        def segment_and_write(scan: Scan, folder: Path, fingerprint: dict) -> SegmentationResult:
            with slice_progress(scan.name, options.quiet or not on_terminal, position=1) as progress:
                result = segment_file(scan.path, model, device=options.device, batch_size=options.batch_size,
                                      progress=progress, cancel=cancel, precision=options.precision)
            result.input_fingerprint = fingerprint
            write_files(result, None, folder, scan.stem, options.preview)
            return result

        def report(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(1)
            if not options.quiet and not on_terminal:
                print(f"[{len(rows)}/{len(scans)}] {row['scan']}: {row['status']}{_row_detail(row)}", flush=True)

        try:
            run_local_batch(scans, outdir, segment_and_write, outputs=expected_outputs(options.preview),
                            overwrite=args.overwrite, model={"name": model.name, "version": model.version},
                            cancel=cancel, on_row=report)
        except (SegmentationCancelled, KeyboardInterrupt):
            _error(f"cancelled after {len(rows)} of {len(scans)} scans; summary so far: {summary_path}")
            return EXIT_CANCELLED
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed")}
    _say(options, f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; summary: {summary_path}")
    for row in rows:
        if row["status"] == "failed":
            _error(f"failed: {row['scan']}: {row['error']}")
    return EXIT_SCANS_FAILED if counts["failed"] else EXIT_OK


def _row_detail(row: dict[str, Any]) -> str:
    if row["status"] == "failed":
        return f" ({row['error']})"
    detail = f" ({row['total_lung_ml']:.0f} mL lung, {row['total_percent_infected']:.1f}% infected)"
    return detail + (f"; {row['note']}" if row.get("note") else "")


# -------------------------------------------------------------------------------------------- info


def run_info(args: argparse.Namespace) -> int:
    """``covidseg info``: the device, then a readable summary of the model manifest (``--json``: the
    whole manifest)."""
    if args.json:
        print(json.dumps(load_model_package(args.model).manifest, indent=2))
        return EXIT_OK
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
    """Readable lines about a model package for ``covidseg info``: identity, network, recipe, labels
    and the cross-validation headline figures when the manifest has them."""
    manifest = model.manifest
    return [
        f"model:     {model.name} {model.version}",
        f"manifest:  {model.manifest_path}",
        f"weights:   {model.weights_path}",
        f"sha256:    {manifest['sha256']}",
        "network:   " + _key_values(manifest.get("architecture", {})),
        "recipe:    " + _key_values(manifest.get("recipe", {})),
        "labels:    " + ", ".join(f"{value} {name}" for value, name in sorted(model.labels.items())),
        "segments:  " + ", ".join(f"{segment.value} {segment.name}" for segment in model.segments),
        *cross_validation_lines(manifest),
        f"licence:   {manifest.get('licence', 'not stated')}",
        "           (covidseg info --json prints the whole manifest)",
    ]


def cross_validation_lines(manifest: dict[str, Any]) -> list[str]:
    """The manifest's ``cross_validation`` summary (per metric: the mean over folds, +- sd when given),
    or a line saying it is not there (and what the manifest's ``metrics`` are instead)."""
    block = manifest.get("cross_validation")
    if not isinstance(block, dict) or not block:
        metrics = manifest.get("metrics") or {}
        fold = metrics.get("fold") if isinstance(metrics, dict) else None
        instead = f"; its 'metrics' are one fold's (fold {fold}) validation" if fold is not None else ""
        return [f"cross-validation: not in the manifest{instead} (see the model card)"]
    statistics = next((block[key] for key in ("mean_of_fold_means", "over_folds", "summary", "metrics")
                       if isinstance(block.get(key), dict)), block)
    figures = [f"{name} {_figure(value)}" for name, value in statistics.items() if _figure(value)]
    folds = block.get("folds", block.get("n_folds"))
    count = len(folds) if isinstance(folds, list) else folds
    heading = f"cross-validation ({count} folds, mean over folds)" if count else "cross-validation (mean over folds)"
    if not figures:
        return [f"{heading}: no figures found in the manifest's cross_validation block"]
    lines = [f"{heading}:"]
    lines += [f"           {', '.join(figures[start:start + 3])}" for start in range(0, len(figures), 3)]
    return lines


def _figure(value: Any) -> str:
    """A metric as text: a number, or {"mean", "sd"} as mean +- sd; empty when neither."""
    if isinstance(value, bool):
        return ""
    if isinstance(value, (int, float)):
        return f"{value:.3f}"
    if isinstance(value, dict) and isinstance(value.get("mean"), (int, float)):
        sd = value.get("sd", value.get("std"))
        return f"{value['mean']:.3f}" + (f" +- {sd:.3f}" if isinstance(sd, (int, float)) else "")
    return ""


def _key_values(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in mapping.items()) or "not stated"


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


@contextlib.contextmanager
def slice_progress(label: str, quiet: bool, position: int = 0) -> Iterator[ProgressCallback]:
    """A progress callback for one scan's slices: a bar on a terminal, a plain line every
    ``PROGRESS_LINE_PERCENT`` % when stderr is a file or a pipe (no escape codes in logs), nothing
    when ``quiet``."""
    if quiet:
        yield lambda done, total: None
    elif _on_terminal():
        with tqdm(total=None, desc=label, unit="slice", leave=False, position=position) as bar:
            def update(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            yield update
    else:
        yield _progress_lines(label)


def _progress_lines(label: str) -> Callable[[int, int], None]:
    reported = [0]

    def report(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if percent >= reported[0] + PROGRESS_LINE_PERCENT or (done == total and reported[0] < 100):
            reported[0] = percent
            print(f"{label}: {done}/{total} slices", file=sys.stderr, flush=True)

    return report


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _say(options: Options, text: str) -> None:
    if not options.quiet:
        print(text, flush=True)


def _error(text: str) -> None:
    print(f"covidseg: {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
