"""Segment every CT scan in a folder through 3D Slicer's MRML scene, without the GUI.

    Slicer --no-main-window --python-script CovidInfectionSeg/Scripts/covidseg_slicer_batch.py \\
        -- --input SCANS_DIR --output RESULTS_DIR [--device auto|cpu|cuda] [--model MODEL.json]

Each scan (NIfTI, NRRD, MetaImage file or DICOM series folder, found recursively) is loaded into the
scene as a volume node, segmented with the module's logic, and written as
``RESULTS_DIR/<scan>/<scan>.seg.nrrd`` (saved by MRML's segmentation writer) with
``<scan>.measurements.csv`` and ``.measurements.json``; ``RESULTS_DIR/summary.csv`` has one row per
scan. A scan that cannot be read or segmented is recorded as failed and the batch goes on.

Exit codes (as the ``covidseg`` command): 0 all scans done, 1 some scans failed, 2 bad arguments or
no scans, 3 the model cannot be loaded, 130 interrupted. The same ``main(argv)`` runs under plain
Python with the ``slicer-core`` package (``python covidseg_slicer_batch.py --input ... --output ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

try:
    import CovidInfectionSegLib  # noqa: F401  (on sys.path when the module is loaded in Slicer, or pip-installed)
except ImportError:  # run straight from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slicer  # noqa: E402

from CovidInfectionSegLib.atomic import write_text_atomic  # noqa: E402
from CovidInfectionSegLib.cli import (  # noqa: E402
    EXIT_CANCELLED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_SCANS_FAILED,
    EXIT_USAGE,
    SUMMARY_FILE,
    Scan,
    find_scans,
    measurement_columns,
    write_summary,
)
from CovidInfectionSegLib.imageio import SUPPORTED_TEXT, read_image  # noqa: E402
from CovidInfectionSegLib.model_package import ModelError  # noqa: E402
from CovidInfectionSegLib.outputs import OutputError, ensure_output_dir, output_paths  # noqa: E402
from CovidInfectionSegLib.slicer_logic import SegmentationLogic, imageToVolumeNode, saveSegmentation  # noqa: E402
from CovidInfectionSegLib.validation import InputError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidseg_slicer_batch.py",
        description="Segment lungs and COVID-19 infection in every CT scan of a folder (3D Slicer batch mode). "
        "Research use only, not for clinical use.",
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of scans (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="results folder (created if needed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per network batch (default: automatic)")
    parser.add_argument("--model", type=Path, default=None, help="model manifest (.json) or .pt (default: bundled)")
    return parser


def main(argv: Sequence[str] | None = None, scene: Any = None) -> int:
    """Run the batch; returns the exit code. ``scene`` defaults to Slicer's scene, or a new MRML scene
    when running outside the Slicer application."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # Slicer passes the separator through
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    if not args.input.is_dir():
        return _fail(f"{args.input}: not a folder of scans", EXIT_USAGE)
    try:
        outdir = ensure_output_dir(args.output)
    except OutputError as error:
        return _fail(str(error), EXIT_USAGE)
    scans = find_scans(args.input, exclude=outdir)
    if not scans:
        return _fail(f"{args.input}: no scans found ({SUPPORTED_TEXT})", EXIT_USAGE)
    logic = SegmentationLogic(args.model)
    try:
        model = logic.model()
    except ModelError as error:
        return _fail(f"model: {error}", EXIT_MODEL)
    scene = scene if scene is not None else _scene()
    print(f"{len(scans)} scans in {args.input}; model {model.describe()}", flush=True)

    rows: list[dict[str, Any]] = []
    summary_path = outdir / SUMMARY_FILE
    try:
        for number, scan in enumerate(scans, start=1):
            row = segment_scan(scan, logic, scene, outdir, args.device, args.batch_size)
            rows.append(row)
            write_summary(summary_path, rows)
            detail = row["error"] or f"{row['total_lung_ml']:.0f} mL lung, {row['total_percent_infected']:.1f}% infected"
            print(f"[{number}/{len(scans)}] {scan.name}: {row['status']} ({detail})", flush=True)
    except KeyboardInterrupt:
        write_summary(summary_path, rows)
        return _fail(f"interrupted after {len(rows)} of {len(scans)} scans; summary so far: {summary_path}", EXIT_CANCELLED)
    failed = [row for row in rows if row["status"] == "failed"]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed; summary: {summary_path}", flush=True)
    return EXIT_SCANS_FAILED if failed else EXIT_OK


def segment_scan(scan: Scan, logic: SegmentationLogic, scene: Any, outdir: Path, device: str, batch_size: int | None) -> dict[str, Any]:
    """Load, segment and save one scan; a failure becomes a 'failed' row. The scene is left as it was."""
    started = time.perf_counter()
    read_warnings: list[str] = []
    added: list[Any] = []
    try:
        image = read_image(scan.path, read_warnings)
        volume = imageToVolumeNode(image, scene, scan.stem)
        added += [volume, volume.GetDisplayNode()]
        applied = logic.process(volume, device=device, batch_size=batch_size)
        added += [applied.segmentationNode, applied.segmentationNode.GetDisplayNode(), applied.tableNode]
        result = applied.result
        result.warnings[:0] = read_warnings
        result.source = str(scan.path)
        paths = output_paths(outdir / scan.name, scan.stem, preview=False)
        ensure_output_dir(paths["segmentation"].parent)
        saveSegmentation(applied.segmentationNode, paths["segmentation"])
        result.measurements.write_csv(paths["measurements_csv"])
        write_text_atomic(paths["measurements_json"], json.dumps(result.summary(), indent=2) + "\n")
    except (InputError, OutputError, RuntimeError, OSError, ValueError) as error:
        return {"scan": scan.name, "status": "failed", "error": str(error), "seconds": _since(started)}
    finally:
        for node in reversed(added):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
    return {
        "scan": scan.name, "status": "ok", "error": "",
        **measurement_columns(result.measurements),
        "seconds": _since(started),
        "warnings": " | ".join(result.warnings),
    }


def _scene() -> Any:
    """Slicer's scene inside the application; a new MRML scene under plain Python (slicer-core)."""
    scene = getattr(slicer, "mrmlScene", None)
    return scene if scene is not None else slicer.vtkMRMLScene()


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)


def _fail(message: str, code: int) -> int:
    print(f"covidseg_slicer_batch: error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    exit_code = main()
    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(exit_code)  # inside Slicer: quit the application with the code
    else:
        sys.exit(exit_code)
