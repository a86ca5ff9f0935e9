"""Batch runs over a folder of scans: discovery, resume decisions, the output-folder lock, one scan's
all-or-nothing outputs, and ``summary.csv``.

Three callers share it: ``covidseg batch`` (:func:`run_local_batch`), the Slicer batch script (which
segments through MRML) and a cluster batch (:mod:`.cluster`), whose driver does discovery
(:func:`find_scans`), holds the lock and the summary (:func:`batch_summary`) and decides what to skip
(:func:`decide`), while workers on other nodes each call :func:`run_scan` on shared storage.
How a scan is segmented is the caller's: a ``segment_and_write(scan, folder, fingerprint)`` callable
that writes the scan's outputs into ``folder`` (with ``fingerprint`` in its ``measurements.json``) and
returns the :class:`SegmentationResult` (or any result with its ``measurements`` and ``warnings``, as the
Slicer batch script's engine result read back from a child process); :func:`segment_and_write_files`
is the engine's own. It raises :class:`StopBatch` when no later scan can succeed either (model or
device unusable).

Layout of an output folder: ``summary.csv``, ``.covidseg-batch.lock`` (and ``.owner``: who holds
it), and per scan ``<scan name>/<stem>.seg.nrrd``, ``.labels.nii.gz``, ``.measurements.csv``,
``.measurements.json``, ``.preview.png``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import SimpleITK as sitk
from filelock import FileLock, Timeout

from .atomic import (
    OutputError,
    OutputLockedError,
    atomic_path,
    pause_point,
    recover_output_sets,
    remove_stale_parts,
    write_output_set,
    write_text_atomic,
)
from .imageio import FILE_SUFFIXES, is_dicom_file, native_messages
from .inference import SegmentationCancelled, is_cancelled
from .itk_paths import itk_path
from .measurements import REGIONS, Measurements
from .model_package import ModelPackage
from .outputs import OUTPUT_SUFFIXES, ensure_output_dir, output_paths, write_files
from .pipeline import SegmentationResult, segment_file
from .validation import InputError

SUMMARY_FILE = "summary.csv"
LOCK_FILE = ".covidseg-batch.lock"
OWNER_FILE = ".covidseg-batch.owner"
MEASUREMENT_FIELDS = ("lung_ml", "infection_ml", "percent_infected", "grade")
# The infection's largest 3D component (focal_lesion.py), for sorting thousands of scans by it.
LESION_COLUMNS = ("largest_lesion_ml", "largest_lesion_across_mm")
SUMMARY_COLUMNS = (
    "scan", "status", "error",
    *(f"{region}_{field}" for region in REGIONS for field in MEASUREMENT_FIELDS),
    *LESION_COLUMNS, "seconds", "warnings", "note",
)
# Image outputs of ours that must never come back as inputs.
OUTPUT_IMAGE_SUFFIXES = (OUTPUT_SUFFIXES["segmentation"], OUTPUT_SUFFIXES["labelmap"])
SUMMARY_INTERVAL_S = 1.0
FINGERPRINT_VERSION = 1
SegmentAndWrite = Callable[["Scan", Path, dict], SegmentationResult]


class BatchFolderError(OutputError):
    """The batch's output folder cannot be used: locked by another run, or summary.csv cannot be written."""


class FolderLockedError(BatchFolderError, OutputLockedError):
    """Another batch holds the output folder."""


class SummaryError(BatchFolderError):
    """summary.csv cannot be written."""


class StopBatch(Exception):
    """Raised by a ``segment_and_write`` when no later scan can succeed either (the model or the device is
    unusable): :func:`run_scan` and :func:`run_local_batch` let it through, after writing the summary
    of the scans done, instead of recording one failed row per scan."""


@dataclass(frozen=True)
class Scan:
    """One scan found by :func:`find_scans`: a file or a DICOM series folder, and its output name."""

    path: Path
    name: str  # relative to the input folder, without the image suffix; also the output sub-folder

    @property
    def stem(self) -> str:
        return Path(self.name).name


@dataclass
class Discovery:
    """What :func:`discover` found: the scans, and our own outputs it left out."""

    scans: list[Scan]
    ignored_outputs: list[Path] = field(default_factory=list)


@dataclass
class Decision:
    """Whether a scan must be segmented (``redo``) and why; a skipped scan's row comes with it."""

    redo: bool
    reason: str
    row: dict[str, Any] | None = None

    @property
    def note(self) -> str:
        """The summary's ``note`` for a scan segmented again (empty for a new one)."""
        return "" if self.reason == "new" else f"segmented: {self.reason}"


# ---------------------------------------------------------------------------------------- discovery


def _folder_name(folder: Path) -> str:
    """A folder's name as an output name. A root has none: a DICOM CD read at E:\\ is named "E"."""
    resolved = folder.resolve()
    return resolved.name or resolved.drive.rstrip(":") or "scan"


def scan_stem(path: str | Path) -> str:
    """Output name for an input: the file name without its image suffix, or the folder's name."""
    path = Path(path)
    if path.is_dir():
        return _folder_name(path)
    if path.suffix.lower() == ".dcm":
        return _folder_name(path.parent)
    name = path.name
    for suffix in sorted(FILE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_scans(folder: str | Path, exclude: str | Path | None = None) -> list[Scan]:
    """The scans under ``folder``: see :func:`discover`."""
    return discover(folder, exclude).scans


def discover(folder: str | Path, exclude: str | Path | None = None) -> Discovery:
    """Image files with a supported suffix and DICOM series folders under ``folder`` (recursively).

    Never our own outputs: hidden entries, ``exclude`` (this run's output folder, when it lies inside
    the input), any earlier batch output folder (:func:`is_output_folder`) and ``.seg.nrrd`` /
    ``.labels.nii.gz`` files are left out; the latter two are listed in ``ignored_outputs``.
    """
    folder = Path(folder)
    excluded = Path(exclude).resolve() if exclude is not None else None
    found: list[tuple[Path, str]] = []
    ignored: list[Path] = []
    for root, dirs, files in os.walk(folder):
        root_path = Path(root)
        kept = []
        for name in sorted(dirs):
            path = root_path / name
            if name.startswith(".") or path.resolve() == excluded:
                continue
            if is_output_folder(path):
                ignored.append(path)
                continue
            kept.append(name)
        dirs[:] = kept
        visible = sorted(f for f in files if not f.startswith("."))
        ours = [f for f in visible if f.lower().endswith(OUTPUT_IMAGE_SUFFIXES)]
        ignored += [root_path / f for f in ours]
        images = [f for f in visible if f.lower().endswith(FILE_SUFFIXES) and f not in ours]
        for name in images:
            relative = (root_path / name).relative_to(folder)
            found.append((root_path / name, str(relative.with_name(scan_stem(root_path / name)).as_posix())))
        others = [f for f in visible if f not in images and f not in ours]
        if others and _has_dicom_series(root_path, others):
            relative = root_path.relative_to(folder)
            found.append((root_path, relative.as_posix() if relative.parts else _folder_name(root_path)))
    names = [name.casefold() for _path, name in found]
    scans = [
        # Two inputs with the same stem (a.nii.gz and a.nrrd, or Scan1 and scan1, one output folder on the
        # case-insensitive file systems of macOS and Windows) keep their full file names apart.
        Scan(path, path.relative_to(folder).as_posix() if names.count(name.casefold()) > 1 and path.is_file() else name)
        for path, name in found
    ]
    return Discovery(scans, ignored)


def is_output_folder(folder: str | Path) -> bool:
    """True for a folder a batch wrote (it has our lock file, or a summary.csv with our header)."""
    folder = Path(folder)
    if (folder / LOCK_FILE).exists():
        return True
    try:
        with open(folder / SUMMARY_FILE, encoding="utf-8") as handle:
            return handle.readline().startswith("scan,status,error")
    except (OSError, UnicodeDecodeError):
        return False


def _has_dicom_series(folder: Path, names: Sequence[str]) -> bool:
    if not any(is_dicom_file(folder / name) or name.lower().endswith(".dcm") for name in names):
        return False
    try:
        readable = itk_path(folder)
    except OSError:
        return True  # it looks like DICOM; reading it says why SimpleITK cannot open its path
    try:
        with native_messages():
            return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(readable))
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------- fingerprinting


def input_fingerprint(path: str | Path, content: bool = True) -> dict[str, Any]:
    """What an input is: its files' names, sizes and modification times (``listing_sha256``) and,
    with ``content``, a sha256 of all their bytes (``content_sha256``). A DICOM folder is every
    visible file in it."""
    files = _input_files(Path(path))
    listing = [[name, stat.st_size, stat.st_mtime_ns] for name, _file, stat in files]
    fingerprint: dict[str, Any] = {
        "version": FINGERPRINT_VERSION,
        "files": len(files),
        "bytes": sum(stat.st_size for _name, _file, stat in files),
        "listing_sha256": hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest(),
    }
    if content:
        digest = hashlib.sha256()
        for name, file, _stat in files:
            digest.update(name.encode("utf-8") + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        fingerprint["content_sha256"] = digest.hexdigest()
    return fingerprint


def input_changed(recorded: dict[str, Any], path: str | Path) -> str | None:
    """None when ``path`` is what ``recorded`` (an :func:`input_fingerprint`) describes, else why not.

    Same names, sizes and times: unchanged, without reading the data. Otherwise the content hash
    decides (a copy or ``touch`` changes the times, not the content)."""
    if recorded.get("version") != FINGERPRINT_VERSION:
        return "fingerprint of another version"
    now = input_fingerprint(path, content=False)
    if now["listing_sha256"] == recorded.get("listing_sha256"):
        return None
    if now["files"] != recorded.get("files") or now["bytes"] != recorded.get("bytes"):
        return f"{now['files']} files, {now['bytes']} bytes; was {recorded.get('files')} files, {recorded.get('bytes')} bytes"
    if input_fingerprint(path)["content_sha256"] != recorded.get("content_sha256"):
        return "same size, different content"
    return None


def _input_files(path: Path) -> list[tuple[str, Path, os.stat_result]]:
    if path.is_dir():
        files = sorted(entry for entry in path.iterdir() if entry.is_file() and not entry.name.startswith("."))
        return [(entry.name, entry, entry.stat()) for entry in files]
    return [(path.name, path, path.stat())]


# ------------------------------------------------------------------------------- resume, one scan


def expected_outputs(preview: bool = True) -> list[str]:
    """The output keys (of :data:`outputs.OUTPUT_SUFFIXES`) a ``covidseg batch`` scan has."""
    return [key for key in OUTPUT_SUFFIXES if preview or key != "preview"]


def decide(
    scan: Scan, outdir: str | Path, outputs: Sequence[str], overwrite: bool = False,
    model: dict[str, Any] | None = None, flip_tta: bool = False, nodule_check: bool = True,
) -> Decision:
    """Whether ``scan`` must be segmented into ``outdir``: not when every output in ``outputs`` (keys
    of :data:`outputs.OUTPUT_SUFFIXES`) is there, its ``measurements.json`` records this input's
    fingerprint, (when given) the same ``model`` (``{"name", "version"}``), the same ``flip_tta``
    (outputs that do not record it were made without) and the same ``nodule_check`` (outputs that do not
    record it count as made with it, the default). What killed runs left
    in the scan's folder is finished or removed first. Cheap: reads file metadata, and the input's
    bytes only when its size or times changed. The caller holds the folder lock."""
    scan_dir = Path(outdir) / scan.name
    try:
        recover_output_sets(scan_dir)
    except (OutputError, OSError) as error:
        return Decision(True, f"what a killed run left cannot be cleaned up ({error})")
    if overwrite:
        return Decision(True, "--overwrite")
    paths = [output_paths(scan_dir, scan.stem)[key] for key in outputs]
    present = [path for path in paths if path.is_file() and path.stat().st_size > 0]
    if len(present) < len(paths):
        return Decision(True, "previous outputs incomplete" if present else "new")
    try:
        record = json.loads(output_paths(scan_dir, scan.stem)["measurements_json"].read_text(encoding="utf-8"))
        measurements = Measurements.from_dict(record["measurements"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return Decision(True, f"previous measurements unreadable ({error})")
    recorded = record.get("input_fingerprint")
    if not isinstance(recorded, dict):
        return Decision(True, "previous outputs do not record which input they came from (older version)")
    try:
        changed = input_changed(recorded, scan.path)
    except OSError as error:
        return Decision(True, f"input cannot be checked ({error})")
    if changed:
        return Decision(True, f"input changed since the previous run ({changed})")
    if model is not None and record.get("model") != model:
        return Decision(True, f"previous outputs were made by model {record.get('model')}")
    if bool(record.get("flip_tta", False)) != flip_tta:
        return Decision(True, f"previous outputs were made {'without' if flip_tta else 'with'} --flip-tta")
    if bool(record.get("nodule_check", True)) != nodule_check:
        return Decision(True, f"previous outputs were made {'with' if nodule_check else 'without'} --no-nodule-check")
    row = {
        "scan": scan.name, "status": "skipped", "error": "",
        **measurement_columns(measurements),
        **lesion_columns(record.get("largest_infection_lesion", "")),
        "warnings": " | ".join(record.get("warnings", [])),
        "note": "outputs complete for this input (--overwrite redoes)",
    }
    return Decision(False, "outputs complete for this input", row)


def run_scan(
    scan: Scan, outdir: str | Path, segment_and_write: SegmentAndWrite, outputs: Sequence[str], note: str = ""
) -> dict[str, Any]:
    """Segment one scan and put its outputs in ``outdir/<scan name>/`` all or nothing; return its row.

    A previous result stays untouched until the new one is complete. What a worker calls: it reads
    the input and writes the outputs itself. A scan that cannot be read, segmented or written gives a
    ``failed`` row; cancelling (:class:`SegmentationCancelled`, Ctrl-C) and :class:`StopBatch` propagate."""
    started = time.perf_counter()
    scan_dir = Path(outdir) / scan.name
    results: list[SegmentationResult] = []

    def write(staging: Path) -> None:
        results.append(segment_and_write(scan, staging, fingerprint))

    try:
        fingerprint = input_fingerprint(scan.path)
        ensure_output_dir(scan_dir)
        paths = output_paths(scan_dir, scan.stem)
        write_output_set(scan_dir, scan.stem, write, expected=[paths[key].name for key in outputs],
                         obsolete=[path.name for path in paths.values()])
    except (SegmentationCancelled, KeyboardInterrupt, StopBatch):
        raise
    except (InputError, OutputError, RuntimeError, OSError, ValueError) as error:
        return {"scan": scan.name, "status": "failed", "error": str(error), "seconds": _since(started), "note": note}
    result = results[0]
    return {
        "scan": scan.name, "status": "ok", "error": "",
        **measurement_columns(result.measurements),
        **lesion_columns(result.largest_lesion_record),
        "seconds": _since(started),
        "warnings": " | ".join(result.warnings),
        "note": note,
    }


def segment_and_write_files(
    scan: Scan, folder: Path, fingerprint: dict, model: ModelPackage, *, preview: bool = True, **options: Any
) -> SegmentationResult:
    """What ``covidseg batch`` does for one scan: :func:`pipeline.segment_file` it with ``model`` and
    ``options`` (device, batch_size, progress, cancel, ...), record ``fingerprint`` and write every
    output (:func:`outputs.write_files`) into ``folder``. With ``model`` and the options bound
    (``functools.partial``) it is a ``segment_and_write`` for :func:`run_scan`."""
    result = segment_file(scan.path, model, **options)
    result.input_fingerprint = fingerprint
    write_files(result, None, folder, scan.stem, preview)
    return result


def measurement_columns(measurements: Measurements) -> dict[str, Any]:
    """Flat summary columns ``<region>_<field>`` (e.g. ``total_percent_infected``)."""
    columns = {}
    for region in REGIONS:
        values = measurements.region(region).to_dict()
        columns.update({f"{region}_{field}": values[field] for field in MEASUREMENT_FIELDS})
    return columns


def lesion_columns(lesion: Any) -> dict[str, Any]:
    """``largest_lesion_ml`` and ``largest_lesion_across_mm`` from a result's ``largest_infection_lesion``
    record: 0 without infection (None), empty for anything but a record (one that predates it: "")."""
    if lesion is None:
        return {column: 0.0 for column in LESION_COLUMNS}
    if not isinstance(lesion, dict):
        return {column: "" for column in LESION_COLUMNS}
    return {"largest_lesion_ml": lesion.get("ml", ""), "largest_lesion_across_mm": lesion.get("extent_mm", "")}


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


# --------------------------------------------------------------------------------- lock, summary


@contextlib.contextmanager
def lock_output_folder(outdir: str | Path) -> Iterator[None]:
    """Hold ``outdir``'s batch lock (``flock`` through filelock: local disks and NFS) meanwhile, or
    raise :class:`FolderLockedError` at once, saying who holds it. The lock goes with the process,
    so a killed batch leaves no stale lock."""
    outdir = Path(outdir)
    lock = FileLock(str(outdir / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout as error:
        try:
            owner = (outdir / OWNER_FILE).read_text(encoding="utf-8").strip()
        except OSError:
            owner = "owner unknown"
        raise FolderLockedError(
            f"{outdir} is in use by another covidseg batch ({owner}); wait for it to finish, or use another "
            "output folder"
        ) from error
    except OSError as error:
        raise FolderLockedError(f"cannot lock the output folder {outdir}: {error}") from error
    try:
        started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        with contextlib.suppress(OSError):
            write_text_atomic(outdir / OWNER_FILE, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n")
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def batch_summary(outdir: str | Path, scans: Sequence[Scan]) -> Iterator[SummaryWriter]:
    """Hold ``outdir``'s lock (:func:`lock_output_folder`) and yield the :class:`SummaryWriter` of its
    ``summary.csv`` for ``scans``, which is written once more on the way out, also when the batch is
    cancelled or fails (unless writing it is what failed). Raises :class:`FolderLockedError` and
    :class:`SummaryError` before any work when either is known at the start."""
    outdir = Path(outdir)
    with lock_output_folder(outdir):
        summary = SummaryWriter(outdir / SUMMARY_FILE, [scan.name for scan in scans])
        try:
            yield summary
        except SummaryError:
            raise
        except BaseException:
            summary.close()
            raise
        summary.close()


def write_summary(path: str | Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = SUMMARY_COLUMNS) -> None:
    """Write a batch summary CSV (one row per scan) atomically. Raises OSError."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as temporary:
        temporary.write_text(buffer.getvalue(), encoding="utf-8")
        pause_point("summary")


class SummaryWriter:
    """``summary.csv`` of a batch, rewritten atomically as rows arrive: in the scans' order, at most
    every ``interval_s`` seconds and on :meth:`close` (a killed run loses only the last rows, which
    the next run rebuilds from the outputs). Raises :class:`SummaryError` with the path and the reason."""

    def __init__(self, path: str | Path, scan_names: Sequence[str] = (), interval_s: float = SUMMARY_INTERVAL_S):
        self.path = Path(path)
        self.interval_s = interval_s
        self.order = {name: index for index, name in enumerate(scan_names)}
        self.rows: dict[str, dict[str, Any]] = {}
        self.written_at = float("-inf")
        self._check_writable()

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["scan"]] = row
        if time.monotonic() - self.written_at >= self.interval_s:
            try:
                self.write()
            except SummaryError as error:
                # On Windows a summary.csv open in Excel cannot be replaced: the batch goes on, and a
                # later write (at the latest close()) tries again.
                if not isinstance(error.__cause__, PermissionError):
                    raise

    def close(self) -> None:
        self.write()

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda row: self.order.get(row["scan"], len(self.order)))
        try:
            write_summary(self.path, rows)
        except OSError as error:
            raise SummaryError(self._message(error)) from error
        self.written_at = time.monotonic()

    def _check_writable(self) -> None:
        """Fail before any scan is segmented when the summary could not be written."""
        try:
            remove_stale_parts(self.path)
            if self.path.exists() and not self.path.is_file():
                raise IsADirectoryError(21, "it is a folder, not a file")
            _probe_write(self.path)
        except OSError as error:
            raise SummaryError(self._message(error)) from error

    def _message(self, error: OSError) -> str:
        reason = error.strerror or str(error)
        if isinstance(error, PermissionError):
            reason += " (is it open in another program, such as a spreadsheet?)"
        return (f"cannot write the batch summary {self.path}: {reason}; the scans' outputs written so far are in "
                "place, and a run after fixing this resumes")


def _probe_write(path: Path) -> None:
    """Create and remove a file beside ``path`` (what an atomic write of it needs). Raises OSError."""
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}.part")  # remove_stale_parts' pattern
    with open(probe, "w", encoding="utf-8") as handle:
        handle.write("probe\n")
    probe.unlink()


# ------------------------------------------------------------------------------------ local loop


def run_local_batch(
    scans: Sequence[Scan],
    outdir: str | Path,
    segment_and_write: SegmentAndWrite,
    *,
    outputs: Sequence[str],
    overwrite: bool = False,
    model: dict[str, Any] | None = None,
    flip_tta: bool = False,
    nodule_check: bool = True,
    cancel: Callable[[], bool] | Any = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment ``scans`` one after another into ``outdir`` (which must exist): lock the folder, skip
    what is done (:func:`decide`), :func:`run_scan` the rest, keep ``summary.csv`` up to date and
    call ``on_row`` with each row. Returns the rows.

    Raises :class:`FolderLockedError` / :class:`SummaryError` (nothing is segmented when either is
    known at the start), and :class:`SegmentationCancelled` when ``cancel`` fires (between scans or
    inside one) or :class:`StopBatch`, after writing the summary of the scans done."""
    outdir = Path(outdir)
    rows: list[dict[str, Any]] = []
    with batch_summary(outdir, scans) as summary:
        for scan in scans:
            if is_cancelled(cancel):
                raise SegmentationCancelled("cancelled between scans")
            decision = decide(scan, outdir, outputs, overwrite, model, flip_tta, nodule_check)
            pause_point("scan")
            if decision.redo:
                row = run_scan(scan, outdir, segment_and_write, outputs, note=decision.note)
            else:
                row = decision.row
            rows.append(row)
            summary.add(row)
            if on_row is not None:
                on_row(row)
    return rows
