"""Read CT volumes (NIfTI, NRRD, MetaImage, a DICOM series folder) and move between the input grid and
the canonical orientation the model sees.

Canonical orientation is LPS (``sitk.DICOMOrient(image, "LPS")``): index x grows toward patient left,
y toward posterior, z toward superior. So a numpy slice ``array[z]`` (rows y, columns x) shows anterior
at the top and patient right on the image left, the radiological view the training slices have.
Reorienting only permutes and flips axes (no resampling), so the way back is exact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .integrity import verify_image_file
from .itk_paths import TURN_ON_UTF8, itk_path, name_closed_to_itk
from .validation import MIN_SLICES, InputError

LOGGER = logging.getLogger(__name__)
CANONICAL_ORIENTATION = "LPS"
FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
SUPPORTED_TEXT = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
# read_image records the path in the image's metadata; the pipeline reports it as the result's source.
SOURCE_KEY = "covidseg_source"
# A gap this many times the usual slice spacing means slices are missing from a DICOM series.
MISSING_SLICE_GAP = 1.5


def read_image(path: str | Path, warnings: list[str] | None = None) -> sitk.Image:
    """Read a CT volume with its geometry (origin, spacing, direction) from a file or a DICOM folder.

    A file is checked byte by byte while it is read (:func:`integrity.verify_image_file`: truncation,
    damaged compressed data, NaN in NIfTI), and the check's error comes first. A folder is read as a
    DICOM series; when it holds several series the one with the most files is read and a message saying
    so is appended to ``warnings``. A single DICOM file (``.dcm`` or any file with the DICOM preamble)
    reads the series it belongs to. Slices missing from a series, and files of the series that cannot be
    read, are errors. What the readers print themselves (ITK warnings) is collected into ``warnings``
    instead of reaching the terminal; with ``warnings=None`` it is logged. Raises :class:`InputError`
    naming the path and the reason.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        image = _read_dicom_folder(path, warnings)
    elif path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    elif path.suffix.lower() == ".dcm" or is_dicom_file(path):
        image = _read_dicom_folder(path.parent, warnings, containing=path)
    else:
        image = _read_file(path, warnings)
    image.SetMetaData(SOURCE_KEY, str(path))
    return image


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _read_file(path: Path, warnings: list[str] | None) -> sitk.Image:
    # The integrity check streams (and decompresses) the whole file as the reader does, and both let go
    # of the GIL, so they run side by side: on 2 cores a 512 x 512 x 300 .nii.gz takes about the check's
    # time instead of the sum. The check's verdict comes first: a damaged file gets its own message,
    # whatever the reader made of it, and nothing the reader printed is reported for it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidseg-verify") as pool:
        verified = pool.submit(verify_image_file, path)
        try:
            image, messages = _read_file_with_itk(path)
        except InputError:
            verified.result()
            raise
        verified.result()
    _report(warnings, [f"{path}: reader says: {message}" for message in messages])
    return image


def _read_file_with_itk(path: Path) -> tuple[sitk.Image, list[str]]:
    """The image in ``path`` and what ITK printed while reading it; :class:`InputError` if it cannot."""
    reader = sitk.ImageFileReader()
    try:
        reader.SetFileName(itk_path(path))
    except OSError as error:
        raise InputError(str(error)) from error
    known = path.name.lower().endswith(FILE_SUFFIXES)
    messages: list[str] = []
    try:
        with native_messages() as messages:
            image = reader.Execute()
    except RuntimeError as error:
        # MetaIO leaves a stale errno behind: the file does exist.
        reason = _itk_reason(error, messages).replace("Reason: No such file or directory; ", "")
        if not known:
            raise InputError(
                f"{path}: unsupported or unreadable file ({reason}); supported: {SUPPORTED_TEXT}"
            ) from error
        raise InputError(f"{path}: cannot be read, the file is damaged or not what its name says ({reason})") from error
    return image, messages


def _read_dicom_folder(folder: Path, warnings: list[str] | None, containing: Path | None = None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        readable_folder = itk_path(folder)
    except OSError as error:
        raise InputError(str(error)) from error
    try:
        with native_messages():
            series_ids = reader.GetGDCMSeriesIDs(readable_folder)
            files_by_series = {sid: reader.GetGDCMSeriesFileNames(readable_folder, sid) for sid in series_ids}
    except RuntimeError as error:
        raise InputError(f"{folder}: cannot scan the folder for DICOM series ({_itk_reason(error)})") from error
    unreadable = _unreadable_dicom_files(folder, files_by_series)
    if not series_ids:
        detail = (f"; {_files_text(unreadable)} look like DICOM but cannot be read{_why_unreadable(unreadable, '')}"
                  if unreadable else "")
        raise InputError(f"{folder}: no DICOM series found in this folder{detail}; supported: {SUPPORTED_TEXT}")
    if containing is not None:
        chosen = next(
            (sid for sid, files in files_by_series.items() if any(Path(f).name == containing.name for f in files)),
            None,
        )
        if chosen is None:
            raise InputError(f"{containing}: not part of a readable DICOM series in {folder}")
    else:
        chosen = max(files_by_series, key=lambda sid: len(files_by_series[sid]))
    notices = []
    if len(series_ids) > 1:
        counts = ", ".join(f"{sid} ({len(files)} files)" for sid, files in files_by_series.items())
        notices.append(
            f"{folder}: {len(series_ids)} DICOM series found; reading {chosen} "
            f"({len(files_by_series[chosen])} files). Series: {counts}"
        )
    damaged = [path for path in unreadable if chosen and _mentions(path, chosen)]
    if damaged:
        raise InputError(
            f"{folder}: {_files_text(damaged)} of {_series_text(chosen)} cannot be read"
            f"{_why_unreadable(damaged, ' (truncated or damaged?)')}; "
            "the volume would miss slices"
        )
    if unreadable:
        notices.append(f"{folder}: {_files_text(unreadable)} look like DICOM but cannot be read"
                       f"{_why_unreadable(unreadable, '')}; ignored")
    reader.SetFileNames(files_by_series[chosen])
    reader.MetaDataDictionaryArrayUpdateOn()
    messages: list[str] = []
    try:
        with native_messages() as messages:
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"{folder}: {_series_text(chosen)} cannot be read ({_itk_reason(error, messages)})") from error
    _check_slice_gaps(folder, chosen, reader, len(files_by_series[chosen]), unreadable)
    if containing is not None and image.GetSize()[2] < MIN_SLICES:  # one slice file (not a multi-frame one)
        count = image.GetSize()[2]
        raise InputError(
            f"{containing}: a DICOM file whose series has only {count} slice{'s' if count != 1 else ''} in "
            f"{folder}; a CT volume is a whole series: pass the folder that holds all its slices"
        )
    _report(warnings, notices + [f"{folder}: reader says: {message}" for message in messages])
    return image


def _unreadable_dicom_files(folder: Path, files_by_series: dict[str, Sequence[str]]) -> list[Path]:
    """Files in ``folder`` with the DICOM preamble that no series lists (GDCM drops files it cannot parse)."""
    listed = {Path(name).name for files in files_by_series.values() for name in files}
    return [
        entry for entry in sorted(folder.iterdir())
        if entry.name not in listed and entry.name.upper() != "DICOMDIR" and not entry.name.startswith(".")
        and entry.is_file() and is_dicom_file(entry)
    ]


def _why_unreadable(paths: Sequence[Path], otherwise: str) -> str:
    """Why these DICOM files cannot be read, where we know: names SimpleITK cannot open on this Windows."""
    named = [path for path in paths if name_closed_to_itk(path)]
    if not named:
        return otherwise
    return (f" ({_files_text(named)} named with characters outside ASCII, which SimpleITK cannot open on this "
            f"Windows: give them plain ASCII names, or {TURN_ON_UTF8})")


def _mentions(path: Path, series_uid: str) -> bool:
    """True when the file's first 64 KiB hold the series' UID (so it belongs to that series)."""
    with open(path, "rb") as handle:
        return series_uid.encode("ascii", "replace") in handle.read(65536)


def _check_slice_gaps(
    folder: Path, series: str, reader: sitk.ImageSeriesReader, count: int, unreadable: Sequence[Path]
) -> None:
    """Raise when the slice positions have a gap (slices missing from the series)."""
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(count)])
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError, IndexError):
        return  # no positions to compare: ITK's own check (a warning) is all there is
    if count < 3 or positions.shape != (count, 3) or len(cosines) != 6:
        return
    normal = np.cross(cosines[:3], cosines[3:])
    along = np.sort(positions @ normal)
    steps = np.diff(along)
    usual = float(np.median(steps))
    widest = int(np.argmax(steps))
    if usual > 0 and steps[widest] > MISSING_SLICE_GAP * usual:
        missing = round(steps[widest] / usual) - 1
        raise InputError(
            f"{folder}: {_series_text(series)} has a gap of {steps[widest]:.3g} mm between the slices at "
            f"{along[widest]:.1f} and {along[widest + 1]:.1f} mm where the slices are {usual:.3g} mm apart: "
            f"about {missing} slice{'s' if missing != 1 else ''} missing (deleted, not copied, or unreadable"
            + (f": {_files_text(unreadable)} look like DICOM but cannot be read" if unreadable else "")
            + "); the volume would be wrong"
        )


def _series_text(series_uid: str) -> str:
    return f"DICOM series {series_uid}" if series_uid else "the DICOM series (no series UID)"


def _files_text(paths: Sequence[Path], shown: int = 3) -> str:
    names = ", ".join(path.name for path in paths[:shown]) + (", ..." if len(paths) > shown else "")
    return f"{len(paths)} file{'s' if len(paths) != 1 else ''} ({names})"


def _report(warnings: list[str] | None, messages: Sequence[str]) -> None:
    """Hand messages to the caller's warning list, or log them when the caller keeps none."""
    for message in messages:
        if warnings is None:
            LOGGER.warning(message)
        else:
            warnings.append(message)


@contextlib.contextmanager
def native_messages() -> Iterator[list[str]]:
    """Collect what C++ code (ITK, GDCM, MetaIO) prints on the process's stderr meanwhile, instead of
    letting ``WARNING: In /tmp/SimpleITK-build/...`` reach the terminal; the yielded list holds the
    cleaned messages once the block ends (also when it raises)."""
    messages: list[str] = []
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no usable stderr (a GUI process): nothing to capture
        yield messages
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            messages.extend(clean_native_messages(sink.read().decode("utf-8", "replace")))


def clean_native_messages(text: str) -> list[str]:
    """ITK/GDCM/MetaIO output as one message per paragraph, without source-file lines and object addresses."""
    messages: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n(?=WARNING: In |ERROR: In )", text):
        lines = [line.strip() for line in paragraph.splitlines()]
        lines = [re.sub(r"^\w+ \(0x[0-9a-fA-F]+\): ", "", line) for line in lines
                 if line and not re.match(r"(WARNING|ERROR): In ", line)]
        message = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if message and message not in messages:
            messages.append(message)
    return messages


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


def _itk_reason(error: RuntimeError, messages: Sequence[str] = ()) -> str:
    """The useful line of an ITK exception (they start with source file and line noise), with what the
    reader printed before it failed."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = next((line[len("sitk::ERROR:"):].strip() for line in reversed(lines) if line.startswith("sitk::ERROR:")),
                  lines[-1] if lines else type(error).__name__)
    return "; ".join([reason, *messages])
