"""The ``covidseg`` command: ``segment`` one scan, ``batch`` a folder of scans, ``info`` on model and device.

Argument handling and messages only: reading and segmenting is :func:`pipeline.segment_file`, writing
:func:`outputs.write_all`, batch discovery, resume, locking and the summary are :mod:`.batch`, and a
batch on a Ray cluster (``batch --ray``) is :mod:`.cluster`.

Exit codes: 0 success; 1 some scans failed (batch); 2 bad input or usage (with ``--ray`` also: Ray not
installed, the cluster unreachable or too small for one worker); 3 model error; 4 the output
folder is in use (another batch holds it) or ``summary.csv`` cannot be written; 130 cancelled (Ctrl-C).
The first Ctrl-C stops after the slice batch in flight, a second one stops at once; a scan's outputs
are written all or nothing either way, and a previous result stays until the new one is complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
    segment_and_write_files,
)
from .cluster import DEFAULT_CPUS_PER_WORKER, DEFAULT_RETRIES, ClusterError, RayBatchReport, import_ray, run_ray_batch
from .imageio import SUPPORTED_TEXT
from .inference import PRECISIONS, ProgressCallback, SegmentationCancelled, pick_device, pick_precision
from .model_package import ModelError, ModelPackage, default_model_path, load_model_package
from .outputs import OutputNotWritableError, ensure_output_dir, write_all
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
STOPPING_LOCAL = "stopping after the current batch of slices (Ctrl-C again to stop now)"
STOPPING_RAY = ("stopping the Ray workers now; the scans they were segmenting are left as they were and done by the "
                "next run")
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
    flip_tta: bool = False
    nodule_check: bool = True


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
    except (UsageError, ClusterError) as error:
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
    run_options.add_argument("--flip-tta", action="store_true",
                             help="test-time augmentation: average each slice with its left-right mirror "
                             "(twice the network time; the model card says what it changes)")
    run_options.add_argument("--no-nodule-check", dest="nodule_check", action="store_false",
                             help="keep small solid infection components as infection; by default they are taken "
                             "for nodules and made lung (the model card's 'Nodule check' says what it changes)")
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
    cluster = batch.add_argument_group(
        "Ray cluster", "spread the scans over the workers of a Ray cluster (needs: pip install -e \".[distributed]\"); "
        "inputs and OUTDIR must be on storage every node sees at the same path")
    cluster.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                         help="run on Ray: the cluster at ADDRESS (host:port of its head, or 'auto' for one started "
                         "on this machine with 'ray start'); without ADDRESS the one in $RAY_ADDRESS, else a new local "
                         "Ray instance. Put it after INPUT_DIR, or write --ray=ADDRESS")
    cluster.add_argument("--gpus-per-worker", type=non_negative_number, default=None, metavar="G",
                         help="GPUs per worker, fractions allowed (0.25: four workers share a GPU); default 0: "
                         "workers on CPUs")
    cluster.add_argument("--cpus-per-worker", type=positive_number, default=None, metavar="C",
                         help=f"CPUs per worker (its torch threads); default {DEFAULT_CPUS_PER_WORKER:g}")
    cluster.add_argument("--workers", type=positive_integer, default=None, metavar="N",
                         help="at most N workers (default: as many as the cluster holds)")
    cluster.add_argument("--retries", type=non_negative_integer, default=None, metavar="R",
                         help="times a scan is tried again after its worker's process died (killed, out of memory), "
                         f"before it is reported failed (default {DEFAULT_RETRIES})")
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


def non_negative_integer(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_number(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_number(text: str) -> float:
    value = float(text)
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _options(args: argparse.Namespace) -> Options:
    return Options(device=args.device, batch_size=args.batch_size, preview=args.preview, quiet=args.quiet,
                   precision=args.precision, flip_tta=args.flip_tta, nodule_check=args.nodule_check)


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
                       precision=options.precision, flip_tta=options.flip_tta, nodule_check=options.nodule_check)
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
    for note in result.notes:
        _say(options, f"post-processing: {note}")
    _say(options, "\n".join(measurement_lines(result.measurements)))
    _say(options, "wrote:\n" + "\n".join(f"  {path}" for path in paths.values()))
    return EXIT_OK


# ------------------------------------------------------------------------------------------- batch


def run_batch(args: argparse.Namespace) -> int:
    """``covidseg batch``: every scan under ``args.input_dir``; summary.csv in ``args.output``. With
    ``--ray`` the scans are spread over a Ray cluster's workers (:func:`cluster.run_ray_batch`)."""
    options = _options(args)
    cluster = _cluster_settings(args)
    input_dir: Path = args.input_dir
    if not input_dir.is_dir():
        raise UsageError(f"{input_dir}: not a folder (batch needs a folder of scans; use 'segment' for one file)")
    try:
        outdir = ensure_output_dir(args.output)
    except OutputNotWritableError as error:
        raise SummaryError(f"cannot write the batch summary: {error}") from error
    except OutputError as error:
        raise UsageError(str(error)) from error
    if cluster is None:
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
    report: RayBatchReport | None = None
    with cancel_on_sigint(options.quiet, STOPPING_LOCAL if cluster is None else STOPPING_RAY) as cancel, \
            tqdm(total=len(scans), desc="scans", unit="scan", disable=options.quiet or not on_terminal) as bar:

        def segment_and_write(scan: Scan, folder: Path, fingerprint: dict) -> SegmentationResult:
            with slice_progress(scan.name, options.quiet or not on_terminal, position=1) as progress:
                return segment_and_write_files(scan, folder, fingerprint, model, preview=options.preview,
                                               device=options.device, batch_size=options.batch_size,
                                               progress=progress, cancel=cancel, precision=options.precision,
                                               flip_tta=options.flip_tta, nodule_check=options.nodule_check)

        def on_row(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(1)
            if not options.quiet and not on_terminal:
                print(f"[{len(rows)}/{len(scans)}] {row['scan']}: {row['status']}{_row_detail(row)}", flush=True)

        def say(text: str) -> None:
            if not options.quiet:
                tqdm.write(text, file=sys.stdout)  # above the bar on a terminal, a plain line otherwise

        try:
            if cluster is None:
                run_local_batch(scans, outdir, segment_and_write, outputs=expected_outputs(options.preview),
                                overwrite=args.overwrite, model={"name": model.name, "version": model.version},
                                flip_tta=options.flip_tta, nodule_check=options.nodule_check,
                                cancel=cancel, on_row=on_row)
            else:
                report = run_ray_batch(scans, outdir, model, **cluster, preview=options.preview,
                                       batch_size=options.batch_size, overwrite=args.overwrite, cancel=cancel,
                                       segment_options={"precision": options.precision, "flip_tta": options.flip_tta,
                                                        "nodule_check": options.nodule_check},
                                       on_row=on_row, log=say, forward_logs=not options.quiet)
        except (SegmentationCancelled, KeyboardInterrupt):
            _error(f"cancelled after {len(rows)} of {len(scans)} scans; summary so far: {summary_path}")
            return EXIT_CANCELLED
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed")}
    _say(options, f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; summary: {summary_path}")
    if report is not None:
        _say(options, "\n".join(report.lines()))
    for row in rows:
        if row["status"] == "failed":
            _error(f"failed: {row['scan']}: {row['error']}")
    return EXIT_SCANS_FAILED if counts["failed"] else EXIT_OK


def _cluster_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """``run_ray_batch``'s settings from ``--ray`` and its options; None without ``--ray``. Raises
    :class:`UsageError` for options that need ``--ray``, and :class:`cluster.RayNotInstalledError`
    (what to install) when Ray is missing."""
    ray_only = {"--gpus-per-worker": args.gpus_per_worker, "--cpus-per-worker": args.cpus_per_worker,
                "--workers": args.workers, "--retries": args.retries}
    if args.ray is None:
        given = [name for name, value in ray_only.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: only with --ray")
        return None
    if args.device != "auto":
        raise UsageError("--device: with --ray each worker uses the device Ray assigns to it (CUDA with "
                         "--gpus-per-worker, else its CPUs); leave --device out")
    if args.precision == "fp16" and not args.gpus_per_worker:
        raise UsageError("--precision fp16 is for CUDA only, and with --ray the workers run on their CPUs unless "
                         "--gpus-per-worker is given")
    import_ray()
    return {"address": args.ray or None, "gpus_per_worker": args.gpus_per_worker or 0.0,
            "cpus_per_worker": args.cpus_per_worker or DEFAULT_CPUS_PER_WORKER, "workers": args.workers,
            "retries": DEFAULT_RETRIES if args.retries is None else args.retries}


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
    figures = _named_figures(statistics)
    folds = block.get("folds", block.get("n_folds"))
    count = len(folds) if isinstance(folds, list) else folds
    heading = f"cross-validation ({count} folds, mean over folds)" if count else "cross-validation (mean over folds)"
    if not figures:
        return [f"{heading}: no figures found in the manifest's cross_validation block"]
    lines = [f"{heading}:"]
    lines += [f"           {', '.join(figures[start:start + 3])}" for start in range(0, len(figures), 3)]
    last = block.get("at_last_epoch")
    last_figures = _named_figures(last) if isinstance(last, dict) else []
    if last_figures:  # training history's scores of each fold's last epoch (the block's note says which epoch above)
        lines.append(f"           at each fold's last epoch: {', '.join(last_figures)}")
    return lines


def _named_figures(statistics: dict[str, Any]) -> list[str]:
    """Each metric of ``statistics`` that has a figure, as "name figure" (see ``_figure``)."""
    named = ((name, _figure(value)) for name, value in statistics.items())
    return [f"{name} {figure}" for name, figure in named if figure]


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
def cancel_on_sigint(quiet: bool = False, stopping: str = STOPPING_LOCAL) -> Iterator[threading.Event]:
    """Yield an Event that the first Ctrl-C sets (work stops at the next batch; ``stopping`` is what
    it tells the user); a second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread,
    Ctrl-C keeps its default behaviour."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        if not quiet:
            _error(stopping)

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
