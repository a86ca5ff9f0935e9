"""The engine in a child process: the entry point the 3D Slicer module starts, and its protocol.

    python -m CovidInfectionSegLib.worker segment --input CT.nrrd --output-dir DIR [--device D] [--flip-tta]
                                                  [--no-nodule-check] [--batch-size N] [--model M] [--name TEXT]
    python -m CovidInfectionSegLib.worker device [--device D]

The child prints one machine-readable line per event on stdout, ``@covidseg {json}``:

- ``{"event": "stage", "stage": S}`` with S in :data:`STAGES`, in that order;
- ``{"event": "progress", "done": n, "total": m}`` slices through the network;
- ``{"event": "result", "labelmap": path, "result": path}`` the files it wrote (see :func:`read_result`);
- ``{"event": "device", ...}`` the answer to ``device`` (torch version, CUDA, the device ``auto`` picks);
- ``{"event": "error", "kind": K, "message": text, "exit_code": c}`` then it exits with ``c``: the
  messages and codes of the ``covidseg`` command (2 bad input or device, 3 model, 1 anything else).

Anything else on stdout or stderr (library warnings, tracebacks) is not part of the protocol. The
parent cancels by killing the child's process tree, in any stage; the child writes only into
``--output-dir``, which the parent owns. Tests may set ``COVIDSEG_WORKER_HOLD_STAGE`` to a stage name
to make the child pause in that stage (inert unless set). Importing this module imports neither torch nor Slicer, so
the parent side (:func:`parse_message`, :func:`read_result`) costs nothing to load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import SimpleITK as sitk

from .atomic import atomic_path, write_text_atomic
from .itk_paths import itk_output_path, itk_path
from .measurements import Measurements
from .segments import SegmentInfo

MESSAGE_PREFIX = "@covidseg "
STAGES = ("loading_model", "reading", "inference", "postprocessing", "writing")
LABELMAP_FILE = "labels.nrrd"
RESULT_FILE = "result.json"
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_MODEL = 0, 1, 2, 3
# Test-only, inert unless set: the child pauses HOLD_SECONDS after announcing this stage, so tests can
# cancel in every stage, however fast it is on a small phantom.
HOLD_STAGE_ENV_VAR = "COVIDSEG_WORKER_HOLD_STAGE"
HOLD_SECONDS = 60.0


def format_message(event: str, **fields: Any) -> str:
    """One protocol line (without the newline)."""
    return MESSAGE_PREFIX + json.dumps({"event": event, **fields})


def parse_message(line: str) -> dict[str, Any] | None:
    """The event of a protocol line, or None for any other output line."""
    if not line.startswith(MESSAGE_PREFIX):
        return None
    try:
        message = json.loads(line[len(MESSAGE_PREFIX):])
    except ValueError:
        return None
    return message if isinstance(message, dict) and "event" in message else None


def _emit(event: str, **fields: Any) -> None:
    print(format_message(event, **fields), flush=True)
    if event == "stage" and fields.get("stage") == os.environ.get(HOLD_STAGE_ENV_VAR):
        time.sleep(HOLD_SECONDS)  # test-only: stand in for a long stage on a large scan


@dataclass
class WorkerResult:
    """A segmentation read back from the child's files: what the Slicer side puts into the scene."""

    labelmap: sitk.Image
    segments: list[SegmentInfo]
    measurements: Measurements
    summary: dict[str, Any]

    @property
    def warnings(self) -> list[str]:
        return list(self.summary.get("warnings", []))

    @property
    def notes(self) -> list[str]:
        """What the post-processing changed in the network's output (``postprocess``'s notes)."""
        return list(self.summary.get("notes", []))

    @property
    def device(self) -> str:
        return str(self.summary.get("device", ""))

    @property
    def largest_lesion_record(self) -> dict[str, Any] | None:
        """The infection's largest lesion as the engine recorded it (``Lesion.to_dict``), or None."""
        return self.summary.get("largest_infection_lesion")

    @property
    def flip_tta(self) -> bool:
        return bool(self.summary.get("flip_tta", False))

    @property
    def nodule_check(self) -> bool:
        """Whether the nodule check (small solid infection made lung) was on (results that predate the record: yes)."""
        return bool(self.summary.get("nodule_check", True))

    @property
    def model_name(self) -> str:
        return str(self.summary.get("model", {}).get("name", ""))

    @property
    def model_version(self) -> str:
        return str(self.summary.get("model", {}).get("version", ""))


def write_result(result: Any, folder: Path) -> tuple[Path, Path]:
    """Write an engine :class:`~.pipeline.SegmentationResult` as the labelmap (NRRD) and the result JSON
    (``summary()`` plus the segments); both atomically. Returns (labelmap path, result path)."""
    labelmap_path, result_path = folder / LABELMAP_FILE, folder / RESULT_FILE
    with atomic_path(labelmap_path) as temporary:
        with itk_output_path(temporary) as writable:
            sitk.WriteImage(sitk.Cast(result.labelmap, sitk.sitkUInt8), writable, useCompression=False)
    record = {"summary": result.summary(), "segments": [segment.to_dict() for segment in result.segments]}
    write_text_atomic(result_path, json.dumps(record, indent=2) + "\n")
    return labelmap_path, result_path


def read_result(labelmap_path: str | Path, result_path: str | Path) -> WorkerResult:
    """Read what :func:`write_result` wrote. Raises OSError or ValueError naming the file if it is unreadable."""
    try:
        record = json.loads(Path(result_path).read_text(encoding="utf-8"))
        segments = [SegmentInfo.from_dict(item) for item in record["segments"]]
        measurements = Measurements.from_dict(record["summary"]["measurements"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{result_path}: not a segmentation result ({error})") from error
    try:
        labelmap = sitk.ReadImage(itk_path(labelmap_path))
    except RuntimeError as error:
        raise OSError(f"{labelmap_path}: cannot read the labelmap ({error})") from error
    return WorkerResult(labelmap, segments, measurements, record["summary"])


# ------------------------------------------------------------------------------------ the child


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m CovidInfectionSegLib.worker",
                                     description="CovidInfectionSeg engine for the 3D Slicer module (one child process per job).")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser("segment", help="segment one CT file into --output-dir")
    segment.add_argument("--input", required=True, type=Path, help="CT image file")
    segment.add_argument("--output-dir", required=True, type=Path, help="existing folder for the result files")
    segment.add_argument("--device", default="auto")
    segment.add_argument("--batch-size", type=int, default=None)
    segment.add_argument("--model", default=None, help="model manifest or .pt (default: the bundled model)")
    segment.add_argument("--name", default=None, help="how messages name the input (default: its path)")
    segment.add_argument("--flip-tta", action="store_true",
                         help="average each slice with its left-right mirror (twice the network time)")
    segment.add_argument("--no-nodule-check", dest="nodule_check", action="store_false",
                         help="keep small solid infection components as infection (default: made lung as nodules)")
    device = commands.add_parser("device", help="report torch, CUDA and the device 'auto' picks")
    device.add_argument("--device", default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every failure ends as an ``error`` line and the exit code it names."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "device":
            return _report_device(args.device)
        return _segment(args)
    except Exception as error:  # the protocol reports everything; the traceback goes to stderr for the log
        import traceback

        traceback.print_exc()
        return _fail("internal", f"unexpected error: {type(error).__name__}: {error}", EXIT_INTERNAL)


def _segment(args: argparse.Namespace) -> int:
    _emit("stage", stage="loading_model")  # importing torch is part of it: seconds on a cold start
    from .imageio import read_image
    from .inference import pick_device
    from .model_package import ModelError, load_model_package
    from .pipeline import segment_image
    from .validation import InputError

    name = args.name or str(args.input)
    try:  # checked first, as the covidseg command does
        pick_device(args.device)
    except (RuntimeError, ValueError) as error:
        return _fail("device", f"device: {error}", EXIT_INPUT)
    try:
        model = load_model_package(args.model)
    except ModelError as error:
        return _fail("model", f"model: {error}", EXIT_MODEL)
    _emit("stage", stage="reading")
    started = time.perf_counter()
    warnings: list[str] = []
    try:
        image = read_image(args.input, warnings)
    except InputError as error:
        return _fail("input", str(error), EXIT_INPUT)
    read_seconds = time.perf_counter() - started
    _emit("stage", stage="inference")

    def progress(done: int, total: int) -> None:
        _emit("progress", done=done, total=total)
        if done >= total:
            _emit("stage", stage="postprocessing")

    try:
        result = segment_image(image, model, device=args.device, batch_size=args.batch_size, progress=progress, name=name,
                               flip_tta=args.flip_tta, nodule_check=args.nodule_check)
    except InputError as error:
        return _fail("input", str(error), EXIT_INPUT)
    result.warnings[:0] = warnings
    result.source = name
    result.timings = {"read": read_seconds, **result.timings}
    _emit("stage", stage="writing")
    try:
        labelmap_path, result_path = write_result(result, args.output_dir)
    except OSError as error:  # disk full, folder removed under us
        return _fail("output", f"cannot write the outputs to {args.output_dir}: {error}", EXIT_INPUT)
    _emit("result", labelmap=str(labelmap_path), result=str(result_path))
    return EXIT_OK


def _report_device(requested: str) -> int:
    import torch

    from .inference import pick_device

    info: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": bool(torch.cuda.is_available()), "gpus": []}
    if info["cuda_available"]:
        info["gpus"] = [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())]
    try:
        info["picked"] = str(pick_device(requested))
    except (RuntimeError, ValueError) as error:
        info["picked"], info["problem"] = None, f"device: {error}"
    _emit("device", **info)
    return EXIT_OK


def _fail(kind: str, message: str, code: int) -> int:
    _emit("error", kind=kind, message=message, exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
