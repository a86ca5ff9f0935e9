"""Segment every CT scan in a folder through 3D Slicer's MRML scene, without the GUI.

    Slicer --no-main-window --python-script CovidInfectionSeg/Scripts/covidseg_slicer_batch.py \\
        -- --input SCANS_DIR --output RESULTS_DIR [--device auto|cpu|cuda] [--model MODEL.json]

Each scan (NIfTI, NRRD, MetaImage file or DICOM series folder, found recursively) is loaded into the
scene as a volume node, segmented with the module's logic (the engine runs in a child process with
``PythonSlicer``, as from the panel), and written as ``RESULTS_DIR/<scan>/<scan>.seg.nrrd`` (saved by
MRML's segmentation writer) with ``<scan>.measurements.csv`` and ``.measurements.json``;
``RESULTS_DIR/summary.csv`` has one row per scan. A scan that cannot be read or segmented is recorded
as failed and the batch goes on; the scene is left empty after each scan.

Exit codes, on every path (Slicer without a main window only ends when the script says so, so the
imports and ``main`` run inside ``try``/``finally``):

    0   all scans done                      3   the model cannot be loaded (no scan can succeed)
    1   some scans failed (see summary.csv) 70  internal error: an import failed or a bug (traceback on stderr)
    2   bad arguments, no scans, unusable device or output folder          130 interrupted

The same ``main(argv)`` runs under plain Python with the ``slicer-core`` package
(``python covidseg_slicer_batch.py --input ... --output ...``), the engine then in ``sys.executable``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_INTERNAL, EXIT_CANCELLED = 0, 1, 2, 3, 70, 130
MODULE_DIR = Path(__file__).resolve().parents[1]  # holds CovidInfectionSegLib and CovidInfectionSegSlicer


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="covidseg_slicer_batch.py",
        description="Segment lungs and COVID-19 infection in every CT scan of a folder (3D Slicer batch mode). "
        "Research use only, not for clinical use.",
        epilog="Exit codes: 0 all done, 1 some scans failed, 2 bad arguments or no scans, 3 model error, "
        "70 internal error, 130 interrupted.",
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of scans (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="results folder (created if needed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per network batch (default: automatic)")
    parser.add_argument("--model", type=Path, default=None, help="model manifest (.json) or .pt (default: bundled)")
    return parser


def main(argv: Sequence[str] | None = None, scene: Any = None, interpreter: str | None = None) -> int:
    """Run the batch; returns the exit code. ``scene`` defaults to Slicer's scene, or a new MRML scene
    outside the Slicer application; ``interpreter`` (the engine's Python) to PythonSlicer inside Slicer
    and ``sys.executable`` outside."""
    if str(MODULE_DIR) not in sys.path:  # run straight from a source checkout: after what is already there
        sys.path.append(str(MODULE_DIR))
    from CovidInfectionSegLib.cli import SUMMARY_FILE, find_scans, write_summary
    from CovidInfectionSegLib.imageio import SUPPORTED_TEXT
    from CovidInfectionSegLib.outputs import OutputError, ensure_output_dir
    from CovidInfectionSegSlicer.logic import SegmentationLogic

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
    logic = SegmentationLogic(interpreter or _engine_interpreter(), model=args.model, batchSize=args.batch_size)
    scene = scene if scene is not None else _scene()
    print(f"{len(scans)} scans in {args.input}", flush=True)

    rows: list[dict[str, Any]] = []
    summary_path = outdir / SUMMARY_FILE
    try:
        for number, scan in enumerate(scans, start=1):
            row = segment_scan(scan, logic, scene, outdir, args.device)
            if row.pop("fatal", None) is not None:
                write_summary(summary_path, rows)
                kind_code = EXIT_MODEL if row["kind"] == "model" else EXIT_USAGE
                return _fail(f"{row['error']}; stopped before segmenting any more scans", kind_code)
            row.pop("kind", None)
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


def segment_scan(scan: Any, logic: Any, scene: Any, outdir: Path, device: str) -> dict[str, Any]:
    """Load, segment and save one scan; any failure of the scan becomes a 'failed' row. A model or
    device error (no scan can succeed) comes back with ``fatal`` set. The scene is left as it was."""
    import json
    import time

    from CovidInfectionSegLib.atomic import write_text_atomic
    from CovidInfectionSegLib.cli import measurement_columns
    from CovidInfectionSegLib.imageio import read_image
    from CovidInfectionSegLib.outputs import ensure_output_dir, output_paths
    from CovidInfectionSegSlicer.logic import EngineError
    from CovidInfectionSegSlicer.results import saveSegmentation
    from CovidInfectionSegSlicer.volumes import imageToVolumeNode

    started = time.perf_counter()
    read_warnings: list[str] = []
    added: list[Any] = []
    try:
        image = read_image(scan.path, read_warnings)
        volume = imageToVolumeNode(image, scene, scan.stem)
        added += [volume, volume.GetDisplayNode()]
        applied = logic.process(volume, device=device)
        added += [applied.segmentationNode, applied.segmentationNode.GetDisplayNode(), applied.tableNode]
        summary = dict(applied.result.summary, source=str(scan.path))
        summary["warnings"] = read_warnings + list(summary.get("warnings", []))
        paths = output_paths(outdir / scan.name, scan.stem, preview=False)
        ensure_output_dir(paths["segmentation"].parent)
        saveSegmentation(applied.segmentationNode, paths["segmentation"])
        applied.measurements.write_csv(paths["measurements_csv"])
        write_text_atomic(paths["measurements_json"], json.dumps(summary, indent=2) + "\n")
    except EngineError as error:
        if error.kind in ("model", "device"):
            return {"scan": scan.name, "status": "failed", "error": str(error), "kind": error.kind, "fatal": True}
        return _failed_row(scan, str(error), started)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # this scan failed (unreadable, not CT, disk full...): record it, go on
        return _failed_row(scan, str(error) or type(error).__name__, started)
    finally:
        for node in reversed(added):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)
    return {
        "scan": scan.name, "status": "ok", "error": "",
        **measurement_columns(applied.measurements),
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": " | ".join(summary["warnings"]),
    }


def _failed_row(scan: Any, message: str, started: float) -> dict[str, Any]:
    import time

    return {"scan": scan.name, "status": "failed", "error": message, "seconds": round(time.perf_counter() - started, 2)}


def _engine_interpreter() -> str:
    """PythonSlicer inside the Slicer application; this Python outside it."""
    if _slicer_application() is None:
        return sys.executable
    from CovidInfectionSegSlicer.engine_process import findPythonSlicer

    return findPythonSlicer()


def _scene() -> Any:
    """Slicer's scene inside the application; a new MRML scene under plain Python (slicer-core)."""
    import slicer

    scene = getattr(slicer, "mrmlScene", None)
    return scene if scene is not None else slicer.vtkMRMLScene()


def _slicer_application() -> Any:
    try:
        import slicer
    except ImportError:
        return None
    return getattr(slicer, "app", None)


def _fail(message: str, code: int) -> int:
    print(f"covidseg_slicer_batch: error: {message}", file=sys.stderr, flush=True)
    return code


def run_as_script() -> None:
    """Run :func:`main` and end the process with its code, whatever happens (imports included)."""
    code = EXIT_INTERNAL
    try:
        code = main()
    except KeyboardInterrupt:
        code = _fail("interrupted", EXIT_CANCELLED)
    except BaseException as error:  # SystemExit too: Slicer must be told to exit, never left running
        traceback.print_exc()
        code = _fail(f"internal error: {type(error).__name__}: {error}", EXIT_INTERNAL)
    finally:
        application = _slicer_application()
        if application is not None:
            import slicer

            slicer.util.exit(code)  # inside Slicer: quit the application with the code
        else:
            sys.exit(code)


if __name__ == "__main__":
    run_as_script()
