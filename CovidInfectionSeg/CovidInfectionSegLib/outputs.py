"""Result files: Slicer segmentation (.seg.nrrd), labelmap (.nii.gz), measurements (.csv, .json) and
the preview PNG (rendered by :mod:`.preview`).

:func:`write_all` writes one result's files all or nothing (:func:`atomic.write_output_set`): into a
staging folder beside them, moved in only when every file is complete, so a crash, Ctrl-C, ``kill -9``
or a full disk never leaves half a result or destroys the previous one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import slicerio

from .atomic import OutputError, OutputLockedError, atomic_path, pause_point, write_output_set, write_text_atomic
from .itk_paths import itk_output_path
from .measurements import Measurements
from .pipeline import SegmentationResult
from .preview import measurement_lines, segment_field, shorten, write_preview_png
from .segments import slicer_terminology

__all__ = [
    "OUTPUT_SUFFIXES", "OutputError", "OutputLockedError", "OutputNotWritableError", "output_paths", "ensure_output_dir", "write_segmentation_nrrd",
    "write_labelmap", "write_measurement_files", "write_measurement_record", "write_files", "write_all",
    "outputs_complete", "measurement_lines",
]


class OutputNotWritableError(OutputError):
    """The output folder exists but this process cannot write in it (permissions, a read-only mount)."""


# gzip level of the .seg.nrrd: 3 compresses a 512 x 512 x 300 labelmap in 0.13 s to 0.9 MB, where
# pynrrd's default 9 takes 1.5 s for 0.3 MB (measured on the project's development CPU).
SEGMENTATION_GZIP_LEVEL = 3

OUTPUT_SUFFIXES = {
    "segmentation": ".seg.nrrd",
    "labelmap": ".labels.nii.gz",
    "measurements_csv": ".measurements.csv",
    "measurements_json": ".measurements.json",
    "preview": ".preview.png",
}


def output_paths(outdir: str | Path, stem: str, preview: bool = True) -> dict[str, Path]:
    """The files :func:`write_all` writes for ``stem`` in ``outdir`` (key -> path)."""
    outdir = Path(outdir)
    return {
        key: outdir / f"{stem}{suffix}"
        for key, suffix in OUTPUT_SUFFIXES.items()
        if preview or key != "preview"
    }


def ensure_output_dir(outdir: str | Path) -> Path:
    """Create ``outdir`` (and parents) and check that files can be written in it.

    Raises :class:`OutputError` naming the folder and the reason (an existing file in the way,
    a parent that is a file, no permission), so callers can fail before any expensive work.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output folder {outdir} is an existing file, not a folder")
    for parent in outdir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"cannot create output folder {outdir}: {parent} is a file, not a folder")
            break
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create output folder {outdir}: {error.strerror or error}") from error
    if not os.access(outdir, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"output folder {outdir} is not writable")
    return outdir


def _color_01(color: Sequence[int]) -> list[float]:
    """Manifest colours are 0-255 integers; Slicer wants 0-1 floats."""
    return [round(float(channel) / 255.0, 6) for channel in color]




def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to physical LPS millimetres (SimpleITK is LPS)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def write_segmentation_nrrd(labelmap: sitk.Image, segments: Sequence[Any], path: str | Path) -> Path:
    """Write ``labelmap`` as a 3D Slicer ``.seg.nrrd`` with one named, coloured segment per entry
    of ``segments`` (objects or dictionaries with value, name, color, terminology).

    Slicer reads the label values, names, colours and terminology codes from the header; the
    geometry is the labelmap's own, so the segmentation overlays the CT it came from.
    """
    path = Path(path)
    # (i, j, k) as a Fortran-ordered view of the (k, j, i) buffer: pynrrd writes it in Fortran order,
    # so the bytes go out as they lie, without the transposed copy a C-ordered array needs.
    image = labelmap if labelmap.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(labelmap, sitk.sitkUInt8)
    voxels = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": ijk_to_lps(labelmap),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "segments": [],
    }
    for segment in segments:
        value = int(segment_field(segment, "value"))
        name = str(segment_field(segment, "name"))
        entry: dict[str, Any] = {
            "id": name.replace(" ", "_"),
            "name": name,
            "labelValue": value,
            "layer": 0,
            "color": _color_01(segment_field(segment, "color")),
            "nameAutoGenerated": False,
            "colorAutoGenerated": False,
            "status": "completed",
        }
        terminology = segment_field(segment, "terminology")
        if terminology:
            entry["terminology"] = slicer_terminology(terminology)
        segmentation["segments"].append(entry)
    with atomic_path(path) as temporary:
        slicerio.write_segmentation(str(temporary), segmentation, compression_level=SEGMENTATION_GZIP_LEVEL)
    return path


def write_labelmap(labelmap: sitk.Image, path: str | Path) -> Path:
    """Write the labelmap (uint8, label values as in the manifest's segments) as NIfTI/NRRD by extension."""
    path = Path(path)
    with atomic_path(path) as temporary, itk_output_path(temporary) as writable:
        try:
            sitk.WriteImage(sitk.Cast(labelmap, sitk.sitkUInt8), writable, useCompression=True)
        except RuntimeError as error:  # ITK reports a full disk or a write error this way
            raise OSError(f"cannot write {path.name}: {_itk_message(error)}") from error
    return path


def _itk_message(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def write_measurement_files(result: SegmentationResult, folder: str | Path, stem: str) -> dict[str, Path]:
    """``<stem>.measurements.csv`` and ``.json`` (:meth:`SegmentationResult.summary`) in ``folder``."""
    return write_measurement_record(result.measurements, result.summary(), folder, stem)


def write_measurement_record(
    measurements: Measurements, record: dict[str, Any], folder: str | Path, stem: str
) -> dict[str, Path]:
    """``<stem>.measurements.csv`` (``measurements``) and ``.json`` (``record``, shaped like
    :meth:`SegmentationResult.summary`) in ``folder``: for a caller that holds the summary as a
    dictionary, such as the Slicer batch script with the engine's result read back from its child."""
    paths = output_paths(folder, stem, preview=False)
    measurements.write_csv(paths["measurements_csv"])
    pause_point("staged:measurements_csv")
    write_text_atomic(paths["measurements_json"], json.dumps(record, indent=2) + "\n")
    pause_point("staged:measurements_json")
    return {key: paths[key] for key in ("measurements_csv", "measurements_json")}


def write_files(
    result: SegmentationResult, ct_image: sitk.Image | None, folder: str | Path, stem: str, preview: bool = True
) -> dict[str, Path]:
    """Write every output of one segmentation straight into ``folder`` (no staging: for a folder
    nobody else reads yet, such as the staging folder of :func:`write_all`); return key -> path.

    ``ct_image`` (for the preview) defaults to the image :func:`pipeline.segment_file` read."""
    paths = output_paths(folder, stem, preview)
    write_segmentation_nrrd(result.labelmap, result.segments, paths["segmentation"])
    pause_point("staged:segmentation")
    write_labelmap(result.labelmap, paths["labelmap"])
    pause_point("staged:labelmap")
    write_measurement_files(result, folder, stem)
    if preview:
        ct_image = ct_image if ct_image is not None else result.input_image
        if ct_image is None:
            raise ValueError("the preview needs the CT image: pass ct_image, or segment with segment_file")
        title = f"CovidInfectionSeg {result.model_name} {result.model_version}: {shorten(result.source or stem, 80)}"
        write_preview_png(ct_image, result.labelmap, result.segments, result.measurements, paths["preview"], title)
        pause_point("staged:preview")
    return paths


def write_all(
    result: SegmentationResult, ct_image: sitk.Image | None, outdir: str | Path, stem: str, preview: bool = True
) -> dict[str, Path]:
    """Write every output of one segmentation into ``outdir`` (created if needed), all or nothing;
    return key -> path.

    The files are written into a staging folder beside them and moved in only when all are complete
    (:func:`atomic.write_output_set`): until then a previous result of ``stem`` stays as it was, and
    after it ``outdir`` holds exactly the new result's files (an earlier preview is removed when this
    run writes none). ``measurements.json`` is :meth:`SegmentationResult.summary`: measurements plus
    the input, model, device, warnings and timings they came from. Raises :class:`OutputError`
    (:class:`OutputLockedError` when another run holds the folder for too long).
    """
    outdir = ensure_output_dir(outdir)
    paths = output_paths(outdir, stem, preview)
    try:
        write_output_set(
            outdir, stem, lambda staging: write_files(result, ct_image, staging, stem, preview),
            expected=[path.name for path in paths.values()],
            obsolete=[path.name for path in output_paths(outdir, stem).values()],
        )
    except OutputError:
        raise
    except OSError as error:  # disk full, permissions changed under us, ...
        raise OutputError(f"cannot write the outputs of {stem} to {outdir}: {error}") from error
    return paths


def outputs_complete(outdir: str | Path, stem: str, preview: bool = True) -> bool:
    """True when every file :func:`write_all` writes for ``stem`` is present and not empty."""
    return all(path.is_file() and path.stat().st_size > 0 for path in output_paths(outdir, stem, preview).values())
