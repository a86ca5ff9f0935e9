"""The whole job: CT image in, labelmap on the input grid + measurements + warnings out.

validate -> canonical LPS -> batched 2D inference -> 3D post-processing -> measurements -> back onto
the input grid. Used by the CLI, the Slicer module and the benchmarks. :func:`segment_file` is the one
read-and-segment path (the CLI's ``segment`` and ``batch`` both use it).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .focal_lesion import Lesion, focal_lesion_warning, largest_lesion
from .imageio import SOURCE_KEY, from_canonical, read_image, to_canonical
from .inference import (
    CancelCheck,
    ProgressCallback,
    SegmentationCancelled,
    is_cancelled,
    pick_device,
    pick_precision,
    predict_volume,
)
from .measurements import Measurements, measure
from .model_package import ModelPackage, SegmentInfo
from .postprocessing import INFECTION, PostprocessingSettings, postprocess
from .validation import check_image, looks_like_hu

__all__ = ["SegmentationResult", "SegmentationCancelled", "segment_image", "segment_file"]

# Adult lungs hold litres of air; far less means the scan does not cover the lungs (or is not a chest CT).
LOW_LUNG_VOLUME_ML = 500.0
IN_MEMORY_SOURCE = "an image passed in memory (not read from a file by covidseg)"
# Voxel types the engine reads as they are (slices are converted one at a time); others become float32.
# CT is int16 or uint16: a float32 copy of the volume would double its memory.
COMPACT_PIXEL_TYPES = (sitk.sitkInt8, sitk.sitkUInt8, sitk.sitkInt16, sitk.sitkUInt16)


@dataclass
class SegmentationResult:
    """Everything one segmentation produced (see ARCHITECTURE.md, engine contract)."""

    labelmap: sitk.Image
    segments: list[SegmentInfo]
    measurements: Measurements
    warnings: list[str]
    timings: dict[str, float]
    device: str
    model_name: str
    model_version: str
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    # The CT as read by segment_file (for the preview); not kept by segment_image.
    input_image: sitk.Image | None = field(default=None, repr=False)
    # What the input was when it was segmented (batch: size, times, content hash), for resuming.
    input_fingerprint: dict[str, Any] | None = None
    precision: str = "fp32"
    flip_tta: bool = False
    # Whether the nodule check (post-processing step 6: small solid infection made lung) was on; it acts on
    # CT in HU only.
    nodule_check: bool = True
    # The infection's largest 3D component (None without infection): batch columns, focal-lesion warning.
    largest_lesion: Lesion | None = None

    @property
    def largest_lesion_record(self) -> dict[str, Any] | None:
        """``largest_lesion`` as a JSON-ready dict, or None (as :class:`worker.WorkerResult` has it)."""
        return None if self.largest_lesion is None else self.largest_lesion.to_dict()

    def summary(self) -> dict[str, Any]:
        """JSON-ready description of the run (no image data)."""
        record: dict[str, Any] = {
            "source": self.source or IN_MEMORY_SOURCE,
            "model": {"name": self.model_name, "version": self.model_version},
            "device": self.device,
            "precision": self.precision,
            "flip_tta": self.flip_tta,
            "nodule_check": self.nodule_check,
            "measurements": self.measurements.to_dict(),
            "largest_infection_lesion": self.largest_lesion_record,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "timings_s": {stage: round(seconds, 3) for stage, seconds in self.timings.items()},
        }
        if self.input_fingerprint is not None:
            record["input_fingerprint"] = self.input_fingerprint
        return record


def segment_image(
    image: sitk.Image,
    model: ModelPackage,
    *,
    device: str = "auto",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    name: str | None = None,
    settings: PostprocessingSettings | None = None,
    precision: str = "auto",
    flip_tta: bool = False,
    nodule_check: bool = True,
) -> SegmentationResult:
    """Segment lungs (right, left) and infection in a 3D CT volume.

    ``precision`` is ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :func:`inference.pick_precision`).
    ``flip_tta`` averages each slice with its left-right mirror (twice the network time).
    ``nodule_check=False`` keeps small solid infection components as infection instead of calling them
    nodules (lung); ``settings`` holds the post-processing's thresholds (default
    :class:`~.postprocessing.PostprocessingSettings`).
    Raises :class:`validation.InputError` for images that cannot be segmented, :class:`SegmentationCancelled`
    when ``cancel`` fires, ``RuntimeError`` for an unavailable device or precision. ``name`` labels
    warnings and is the result's ``source``; it defaults to the path :func:`imageio.read_image` recorded
    in the image, else "image".
    """
    started = time.perf_counter()
    read_from = image.GetMetaData(SOURCE_KEY) if image.HasMetaDataKey(SOURCE_KEY) else None
    source = name if name is not None else read_from
    name = source or "image"
    warnings = check_image(image, name)
    torch_device = pick_device(device)
    precision = pick_precision(precision, torch_device)
    canonical = to_canonical(image)
    if canonical.GetPixelID() not in COMPACT_PIXEL_TYPES:
        canonical = sitk.Cast(canonical, sitk.sitkFloat32)
    volume = sitk.GetArrayViewFromImage(canonical)
    in_hu = looks_like_hu(volume)

    inference_started = time.perf_counter()
    classes = predict_volume(volume, model, torch_device, batch_size, progress, cancel, precision, flip_tta,
                             slice_spacing_mm=canonical.GetSpacing()[2])
    inference_seconds = time.perf_counter() - inference_started
    if is_cancelled(cancel):
        raise SegmentationCancelled("cancelled after inference")

    settings = settings or PostprocessingSettings()
    if not nodule_check:
        settings = dataclasses.replace(settings, max_nodule_ml=0.0)
    post_started = time.perf_counter()
    lungs = postprocess(
        classes,
        volume,
        canonical.GetSpacing(),
        lung_class=model.label_value("lung"),
        infection_class=model.label_value("infection"),
        intensities_in_hu=in_hu,
        settings=settings,
    )
    del classes
    infection = lungs.region_labels == INFECTION  # no lung or infection outside the region
    measurements = measure(lungs.region_side, infection, canonical.GetSpacing())
    lesion = largest_lesion(infection, lungs.region_side, canonical.GetSpacing()[::-1])
    del infection
    label_image = sitk.GetImageFromArray(lungs.labels)
    label_image.CopyInformation(canonical)
    labelmap = from_canonical(label_image, image)
    post_seconds = time.perf_counter() - post_started

    warnings.extend(_result_warnings(measurements, name))
    focal = focal_lesion_warning(lesion, measurements.total.infection_ml, name)
    if focal is not None:
        warnings.append(focal)
    timings = {
        "validate": inference_started - started,
        "preprocess_infer": inference_seconds,
        "postprocess": post_seconds,
        "total": time.perf_counter() - started,
    }
    return SegmentationResult(
        labelmap=labelmap,
        segments=list(model.segments),
        measurements=measurements,
        warnings=warnings,
        timings=timings,
        device=str(torch_device),
        model_name=model.name,
        model_version=model.version,
        notes=lungs.notes,
        source=source,
        precision=precision,
        flip_tta=flip_tta,
        nodule_check=settings.max_nodule_ml > 0,
        largest_lesion=lesion,
    )


def segment_file(path: str | Path, model: ModelPackage, **options: Any) -> SegmentationResult:
    """Read a CT (file or DICOM folder, see :func:`imageio.read_image`) and :func:`segment_image` it.

    The reader's warnings come first in ``result.warnings``, the read time in ``result.timings``,
    and ``result.input_image`` holds the CT (for the preview). Takes :func:`segment_image`'s options."""
    started = time.perf_counter()
    read_warnings: list[str] = []
    image = read_image(path, read_warnings)
    read_seconds = time.perf_counter() - started
    options.setdefault("name", str(path))
    result = segment_image(image, model, **options)
    result.warnings[:0] = read_warnings
    result.timings = {"read": read_seconds, **result.timings, "total": result.timings["total"] + read_seconds}
    result.input_image = image
    return result


def _result_warnings(measurements: Measurements, name: str) -> list[str]:
    warnings = []
    total = measurements.total.lung_ml
    if total < LOW_LUNG_VOLUME_ML:
        warnings.append(
            f"{name}: only {total:.0f} mL of lung found (adult lungs hold litres); "
            "the scan may not cover the chest, or it is not a chest CT"
        )
    else:
        for side, region in (("right", measurements.right_lung), ("left", measurements.left_lung)):
            if region.lung_ml < 0.1 * total:
                warnings.append(
                    f"{name}: the {side} lung is only {region.lung_ml:.0f} mL of {total:.0f} mL found; "
                    "check the left/right assignment and the scan coverage"
                )
    return warnings
