"""Segment every CT scan in a folder through 3D Slicer's MRML scene, without the GUI.

    Slicer --no-main-window --python-script CovidInfectionSeg/Scripts/covidseg_slicer_batch.py \\
        -- --input SCANS_DIR --output RESULTS_DIR [--device auto|cpu|cuda] [--model MODEL.json] [--flip-tta]
           [--no-nodule-check] [--overwrite]

Each scan (NIfTI, NRRD, MetaImage file or DICOM series folder, found recursively) is loaded into the
scene as a volume node, segmented with the module's logic (the engine runs in a child process with
``PythonSlicer``, as from the panel), and written as ``RESULTS_DIR/<scan>/<scan>.seg.nrrd`` (saved by
MRML's segmentation writer) with ``<scan>.measurements.csv`` and ``.measurements.json``;
``RESULTS_DIR/summary.csv`` has one row per scan. A scan that cannot be read or segmented is recorded
as failed and the batch goes on; the scene is left empty after each scan.

Discovery, resume, the folder lock and the summary are the engine's batch module
(``CovidInfectionSegLib.batch``), as for ``covidseg batch``: our own outputs are never taken as scans;
a scan's three files are written into a staging folder and moved in only when all are complete, so a
killed run never leaves half a result or destroys the previous one; ``measurements.json`` records a
fingerprint of the input, and a re-run skips a scan (``skipped``) only when its outputs are complete for
the same input, model, ``--flip-tta`` and ``--no-nodule-check`` settings, and segments it again when the input changed
(``--overwrite`` redoes every scan). The output folder is locked while the script runs: a second batch on it is refused.

Exit codes, on every path (Slicer without a main window only ends when the script says so, so the
imports and ``main`` run inside ``try``/``finally``):

    0   all scans done (segmented or skipped)
    1   some scans failed (see summary.csv)
    2   bad arguments, no scans, unusable device, or an output folder that cannot be created
    3   the model cannot be loaded (the batch stops: no scan could succeed)
    4   output folder in use (another batch holds its lock) or summary.csv not writable (read-only folder,
        summary.csv is a folder, disk full); the scans finished so far are kept and a re-run resumes
    70  internal error: an import failed or a bug (traceback on stderr)
    130 interrupted

The same ``main(argv)`` runs under plain Python with the ``slicer-core`` package
(``python covidseg_slicer_batch.py --input ... --output ...``), the engine then in ``sys.executable``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_SCANS_FAILED, EXIT_USAGE, EXIT_MODEL, EXIT_OUTPUT_IN_USE = 0, 1, 2, 3, 4
EXIT_INTERNAL, EXIT_CANCELLED = 70, 130
MODULE_DIR = Path(__file__).resolve().parents[1]  # holds CovidInfectionSegLib and CovidInfectionSegSlicer
# What this script writes per scan (keys of CovidInfectionSegLib.outputs.OUTPUT_SUFFIXES); the labelmap
# and the preview are the covidseg command's.
OUTPUTS = ("segmentation", "measurements_csv", "measurements_json")


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="covidseg_slicer_batch.py",
        description="Segment lungs and COVID-19 infection in every CT scan of a folder (3D Slicer batch mode). "
        "Research use only, not for clinical use.",
        epilog="Exit codes: 0 all done, 1 some scans failed, 2 bad arguments or no scans, 3 model error, "
        "4 output folder in use by another batch or summary.csv not writable, 70 internal error, 130 interrupted.",
    )
    parser.add_argument("--input", required=True, type=Path, help="folder of scans (searched recursively)")
    parser.add_argument("--output", required=True, type=Path, help="results folder (created if needed)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per network batch (default: automatic)")
    parser.add_argument("--model", type=Path, default=None, help="model manifest (.json) or .pt (default: bundled)")
    parser.add_argument("--flip-tta", action="store_true",
                        help="average each slice with its left-right mirror (twice the network time)")
    parser.add_argument("--no-nodule-check", dest="nodule_check", action="store_false",
                        help="keep small solid infection components as infection (default: made lung as nodules)")
    parser.add_argument("--overwrite", action="store_true",
                        help="segment every scan again, also those whose outputs are complete for the same input")
    return parser


def main(argv: Sequence[str] | None = None, scene: Any = None, interpreter: str | None = None) -> int:
    """Run the batch; returns the exit code. ``scene`` defaults to Slicer's scene, or a new MRML scene
    outside the Slicer application; ``interpreter`` (the engine's Python) to PythonSlicer inside Slicer
    and ``sys.executable`` outside."""
    if str(MODULE_DIR) not in sys.path:  # run straight from a source checkout: after what is already there
        sys.path.append(str(MODULE_DIR))
    from CovidInfectionSegLib.batch import SUMMARY_FILE, BatchFolderError, StopBatch, discover, run_local_batch
    from CovidInfectionSegLib.imageio import SUPPORTED_TEXT
    from CovidInfectionSegLib.model_package import ModelError, read_model_manifest
    from CovidInfectionSegLib.outputs import OutputError, OutputNotWritableError, ensure_output_dir
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
    except OutputNotWritableError as error:
        return _fail(f"cannot write the batch summary: {error}", EXIT_OUTPUT_IN_USE)
    except OutputError as error:
        return _fail(str(error), EXIT_USAGE)
    found = discover(args.input, exclude=outdir)
    scans = found.scans
    if found.ignored_outputs:
        print(f"left out {len(found.ignored_outputs)} covidseg outputs found under {args.input}", flush=True)
    if not scans:
        return _fail(f"{args.input}: no scans found ({SUPPORTED_TEXT})", EXIT_USAGE)
    try:  # the child process loads the network; its name and version decide whether old outputs still count
        manifest = read_model_manifest(args.model)
    except ModelError as error:
        return _fail(f"model: {error}", EXIT_MODEL)
    model = {"name": str(manifest["name"]), "version": str(manifest["version"])}
    logic = SegmentationLogic(interpreter or _engine_interpreter(), model=args.model, batchSize=args.batch_size)
    scene = scene if scene is not None else _scene()
    print(f"{len(scans)} scans in {args.input}; model: {model['name']} {model['version']}", flush=True)

    rows: list[dict[str, Any]] = []
    summary_path = outdir / SUMMARY_FILE

    def segment_and_write(scan: Any, folder: Path, fingerprint: dict) -> Any:
        return segment_scan(scan, folder, fingerprint, logic, scene, args.device, args.flip_tta, args.nodule_check)

    def report(row: dict[str, Any]) -> None:
        rows.append(row)
        print(f"[{len(rows)}/{len(scans)}] {row['scan']}: {row['status']} ({_row_detail(row)})", flush=True)

    try:
        run_local_batch(scans, outdir, segment_and_write, outputs=OUTPUTS, overwrite=args.overwrite, model=model,
                        on_row=report, flip_tta=args.flip_tta, nodule_check=args.nodule_check)
    except BatchFolderError as error:  # locked by another batch, or the summary cannot be written
        return _fail(str(error), EXIT_OUTPUT_IN_USE)
    except StopBatch as error:
        code = EXIT_MODEL if getattr(error.__cause__, "kind", None) == "model" else EXIT_USAGE
        return _fail(f"{error}; stopped before segmenting any more scans (summary so far: {summary_path})", code)
    except KeyboardInterrupt:
        return _fail(f"interrupted after {len(rows)} of {len(scans)} scans; summary so far: {summary_path}", EXIT_CANCELLED)
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "failed")}
    print(f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed; summary: {summary_path}",
          flush=True)
    return EXIT_SCANS_FAILED if counts["failed"] else EXIT_OK


def segment_scan(scan: Any, folder: Path, fingerprint: dict, logic: Any, scene: Any, device: str,
                 flip_tta: bool = False, nodule_check: bool = True) -> Any:
    """Load, segment and save one scan (a ``batch.Scan``) into ``folder``, the staging folder of
    ``batch.run_scan``: ``<stem>.seg.nrrd`` through MRML's writer and the measurement files, whose JSON
    records ``fingerprint``. Returns the engine's result (measurements and warnings, read warnings first).

    A scan that cannot be read, segmented or written raises an OSError, RuntimeError or ValueError,
    which ``run_scan`` records as the scan's failed row (anything else is turned into a RuntimeError);
    a model or device error (no scan can succeed) raises ``batch.StopBatch``. The scene is left as it was."""
    import dataclasses

    from CovidInfectionSegLib.atomic import pause_point
    from CovidInfectionSegLib.batch import StopBatch
    from CovidInfectionSegLib.imageio import read_image
    from CovidInfectionSegLib.outputs import output_paths, write_measurement_record
    from CovidInfectionSegSlicer.logic import EngineError
    from CovidInfectionSegSlicer.results import saveSegmentation
    from CovidInfectionSegSlicer.volumes import imageToVolumeNode

    read_warnings: list[str] = []
    added: list[Any] = []
    try:
        image = read_image(scan.path, read_warnings)
        volume = imageToVolumeNode(image, scene, scan.stem)
        added += [volume, volume.GetDisplayNode()]
        del image
        applied = logic.process(volume, device=device, flipTTA=flip_tta, noduleCheck=nodule_check)
        added += [applied.segmentationNode, applied.segmentationNode.GetDisplayNode(), applied.tableNode]
        summary = dict(applied.result.summary, source=str(scan.path), input_fingerprint=fingerprint)
        summary["warnings"] = read_warnings + list(summary.get("warnings", []))
        saveSegmentation(applied.segmentationNode, output_paths(folder, scan.stem)["segmentation"])
        pause_point("staged:segmentation")
        write_measurement_record(applied.measurements, summary, folder, scan.stem)
        return dataclasses.replace(applied.result, summary=summary)
    except EngineError as error:
        if error.kind in ("model", "device"):
            raise StopBatch(str(error)) from error
        raise
    except Exception as error:
        if isinstance(error, (OSError, RuntimeError, ValueError)):
            raise
        # a bug, or an API this Slicer version lacks: this scan failed, the batch goes on
        raise RuntimeError(f"{type(error).__name__}: {error}") from error
    finally:
        for node in reversed(added):
            if node is not None and node.GetScene() is scene:
                scene.RemoveNode(node)


def _row_detail(row: dict[str, Any]) -> str:
    if row["status"] == "failed":
        return row["error"]
    detail = f"{row['total_lung_ml']:.0f} mL lung, {row['total_percent_infected']:.1f}% infected"
    return detail + (f"; {row['note']}" if row.get("note") else "")


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
