"""Read CT volumes (NIfTI, NRRD, MetaImage, a DICOM series folder) and move between the input grid and
the canonical orientation the model sees.

Canonical orientation is LPS (``sitk.DICOMOrient(image, "LPS")``): index x grows toward patient left,
y toward posterior, z toward superior. So a numpy slice ``array[z]`` (rows y, columns x) shows anterior
at the top and patient right on the image left, the radiological view the training slices have.
Reorienting only permutes and flips axes (no resampling), so the way back is exact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .validation import InputError

LOGGER = logging.getLogger(__name__)
CANONICAL_ORIENTATION = "LPS"
FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"


def read_image(path: str | Path, warnings: list[str] | None = None) -> sitk.Image:
    """Read a CT volume with its geometry (origin, spacing, direction) from a file or a DICOM folder.

    A folder is read as a DICOM series; when it holds several series the one with the most files is
    read and a message saying so is appended to ``warnings`` (and logged). A single ``.dcm`` file reads
    the series it belongs to. Raises :class:`InputError` naming the path and the reason.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_folder(path, warnings)
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    if path.suffix.lower() == ".dcm":
        return _read_dicom_folder(path.parent, warnings, containing=path)
    return _read_file(path)


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    known = path.name.lower().endswith(FILE_SUFFIXES)
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error)
        if not known:
            raise InputError(
                f"{path}: unsupported or unreadable file ({reason}); supported: {SUPPORTED_TEXT}"
            ) from error
        raise InputError(f"{path}: cannot be read, the file is damaged or not what its name says ({reason})") from error


def _read_dicom_folder(folder: Path, warnings: list[str] | None, containing: Path | None = None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        series_ids = reader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as error:
        raise InputError(f"{folder}: cannot scan the folder for DICOM series ({_itk_reason(error)})") from error
    if not series_ids:
        raise InputError(f"{folder}: no DICOM series found in this folder; supported: {SUPPORTED_TEXT}")
    files_by_series = {series_id: reader.GetGDCMSeriesFileNames(str(folder), series_id) for series_id in series_ids}
    if containing is not None:
        chosen = next(
            (sid for sid, files in files_by_series.items() if any(Path(f).name == containing.name for f in files)),
            None,
        )
        if chosen is None:
            raise InputError(f"{containing}: not part of a readable DICOM series in {folder}")
    else:
        chosen = max(files_by_series, key=lambda sid: len(files_by_series[sid]))
    if len(series_ids) > 1:
        counts = ", ".join(f"{sid} ({len(files)} files)" for sid, files in files_by_series.items())
        message = (
            f"{folder}: {len(series_ids)} DICOM series found; reading {chosen} "
            f"({len(files_by_series[chosen])} files). Series: {counts}"
        )
        LOGGER.warning(message)
        if warnings is not None:
            warnings.append(message)
    reader.SetFileNames(files_by_series[chosen])
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: DICOM series {chosen} cannot be read ({_itk_reason(error)})") from error


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS by permuting/flipping axes only (no resampling; physical positions unchanged).
    An image that is already LPS is returned as it is, not copied (for a CT, hundreds of MB)."""
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()) == CANONICAL_ORIENTATION:
        return image
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def from_canonical(label_image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Map a label image on the canonical grid of ``reference`` back onto ``reference``'s exact grid.

    The result has ``reference``'s size, spacing, origin and direction (bit for bit, oblique directions
    included) and every voxel keeps its physical position. When ``reference`` is already LPS, the result
    is ``label_image`` itself (no copy), its geometry set to the reference's.
    """
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.GetDirection())
    restored = label_image if orientation == CANONICAL_ORIENTATION else sitk.DICOMOrient(label_image, orientation)
    same_grid = (
        restored.GetSize() == reference.GetSize()
        and np.allclose(restored.GetDirection(), reference.GetDirection(), atol=1e-6)
        and np.allclose(restored.GetOrigin(), reference.GetOrigin(), atol=1e-3 * min(reference.GetSpacing()))
        and np.allclose(restored.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    )
    if not same_grid:
        # Not a permutation of the reference's grid (the label was not made from it): resample, exactly
        # on voxel centres when it is.
        return sitk.Resample(
            label_image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_image.GetPixelID()
        )
    restored.CopyInformation(reference)  # removes floating-point noise from the reorientation
    return restored


def _itk_reason(error: RuntimeError) -> str:
    """The useful line of an ITK exception (they start with source file and line noise)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("sitk::ERROR:"):
            return line[len("sitk::ERROR:") :].strip()
    return lines[-1] if lines else type(error).__name__
