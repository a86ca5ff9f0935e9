"""Whole-scan checks: run the engine on whole real scans and measure what it gets wrong there.

For each scan, the engine runs exactly as ``covidseg segment`` runs it (:func:`pipeline.segment_file`,
default post-processing), then on the canonical LPS grid:

- lung mL (right, left, total; infection included) and infection mL, as the engine measures them;
- model lung (any label) more than 5 mm outside the classical HU lung mask
  (:func:`classical_lung.classical_lung_mask`): stomach, bowel, air outside the lungs called lung;
- classical lung more than 5 mm from the model's lung: apex and bases the model missed (and how much of
  it lies in the top and the bottom fifth of the classical lung's height);
- per scan where set, the lung or infection mL in its lowest N slices (covid-chest-ct: 17 slices of
  stomach and bowel below the lungs);
- for LIDC scans, the share of the radiologists' nodule voxels called infection (:mod:`lidc_nodules`);
- the infection's 3D components, largest first, with their HU make-up (:mod:`infection_components`):
  where the false infection of a healthy scan sits and what it looks like; the same for the model lung
  more than 5 mm outside the classical lung (a solid mass called lung, gas in the stomach called lung).

Writes ``wholescan.csv``, ``wholescan.md`` (a Markdown table with the targets of issue 10 beside each
value, ready for a model card, each scan's five largest infection components and three largest
components of lung outside the classical lung), one ``<scan>.json`` record as each scan finishes, one
``<scan>_infection_components.csv`` and one ``<scan>_outside_components.csv`` (every component of at
least 0.1 mL) and one ``<scan>.png`` montage per scan: the model's segments, the classical mask's outline, the
classical lung missed by more than 5 mm outlined (its worst slice always shown) and, for LIDC, the
nodules' outlines.

    python -m covidseg_training wholescan --out runs/wholescan-v1
    python -m covidseg_training wholescan --model runs/v2/fold0/model.json \\
        --model-for LIDC-IDRI-0003=runs/v2/fold1/model.json --out runs/v2/wholescan

LIDC scans must be scored by a model that did not train on them (``--model-for``); a scan named in
its model's ``training_data`` is flagged in the table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from CovidInfectionSegLib.atomic import write_text_atomic
from CovidInfectionSegLib.imageio import to_canonical
from CovidInfectionSegLib.inference import PRECISIONS, cpu_name, pick_device, pick_precision
from CovidInfectionSegLib.model_package import ModelError, ModelPackage, default_model_path, load_model_package
from CovidInfectionSegLib.pipeline import SegmentationResult, segment_file
from CovidInfectionSegLib.postprocessing import (
    INFECTION,
    WITHOUT_ANATOMY_CHECKS,
    WITHOUT_NODULE_CHECK,
    PostprocessingSettings,
)
from CovidInfectionSegLib.preview import Outline, choose_preview_slices, render_preview, write_png
from CovidInfectionSegLib.validation import InputError

from .classical_lung import classical_lung_mask, distance_outside_mm
from .infection_components import components_csv, components_markdown, infection_components, mask_components
from .lidc_nodules import nodule_mask, parse_nodule_xml
from .negatives import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
DISTANCE_MM = 5.0
PREVIEW_SLICES = 16
CLASSICAL_COLOR = (0, 220, 255)
NODULE_COLOR = (255, 0, 255)
MISSED_COLOR = (255, 140, 0)
KERNEL_PAIR = ("example-chest-ct-kernel-L", "example-chest-ct-kernel-B")
KERNEL_AGREEMENT_PERCENT = 3.0


@dataclass(frozen=True)
class Target:
    """A limit from issue 10's "done when" on one measured value."""

    metric: str
    op: str  # "<", "<=" or ">="
    limit: float

    def met(self, value: float) -> bool:
        return {"<": value < self.limit, "<=": value <= self.limit, ">=": value >= self.limit}[self.op]

    def text(self) -> str:
        return f"{self.op} {self.limit:g}"


HEALTHY = (Target("infection_ml", "<", 30.0), Target("outside_classical_ml", "<", 20.0))
LIDC = (*HEALTHY, Target("nodule_infection_percent", "<=", 5.0))
COVID = (Target("infection_ml", ">=", 200.0), Target("low_slices_ml", "<", 5.0))


@dataclass
class ScanSpec:
    """One scan to check and its per-scan settings."""

    name: str
    path: Path
    targets: tuple[Target, ...] = ()
    low_slices: int = 0
    nodules: Path | None = None


# name: (path under ../shared/data, targets, lowest slices to measure, nodule XML)
DEFAULT_SCANS: dict[str, tuple[str, tuple[Target, ...], int, str | None]] = {
    "covid-chest-ct": ("covid-chest-ct/MIDRC-RICORD-1A-419639-001012.nii.gz", COVID, 17, None),
    "example-chest-ct-kernel-L": ("example-chest-ct/Lung_Dx-A0001_kernel-L.nii.gz", HEALTHY, 0, None),
    "example-chest-ct-kernel-B": ("example-chest-ct/Lung_Dx-A0001_kernel-B.nii.gz", HEALTHY, 0, None),
    "LIDC-IDRI-0001": ("lidc-idri-chest-ct/LIDC-IDRI-0001.nii.gz", LIDC, 0,
                       "lidc-idri-chest-ct/LIDC-IDRI-0001.nodules.xml"),
    "LIDC-IDRI-0003": ("lidc-idri-chest-ct/LIDC-IDRI-0003.nii.gz", LIDC, 0,
                       "lidc-idri-chest-ct/LIDC-IDRI-0003.nodules.xml"),
    # No target in issue 10's "done when"; the data's README: little or no lung, no infection.
    "abdominal-ct": ("example-abdominal-ct/example_ct.nii.gz", (), 0, None),
    "abdominal-ct-dicom": ("example-abdominal-ct/dicom", (), 0, None),
}


def default_scan(name: str, root: Path = SHARED_DATA) -> ScanSpec:
    relative, targets, low_slices, nodules = DEFAULT_SCANS[name]
    return ScanSpec(name, root / relative, targets, low_slices, root / nodules if nodules else None)


# ------------------------------------------------------------------------------------------ measuring


def missed_lung(labels: np.ndarray, classical: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The classical lung more than 5 mm from the model's lung (any label)."""
    return distance_outside_mm(classical, labels > 0, spacing_zyx) > DISTANCE_MM


def lung_outside_classical(labels: np.ndarray, classical: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The model's lung (any label) more than 5 mm outside the classical lung."""
    return distance_outside_mm(labels > 0, classical, spacing_zyx) > DISTANCE_MM


def measure_scan(labels: np.ndarray, classical: np.ndarray, spacing_zyx: Sequence[float], *,
                 low_slices: int = 0, nodules: np.ndarray | None = None,
                 missed: np.ndarray | None = None, outside: np.ndarray | None = None) -> dict[str, float]:
    """The checks on the canonical (z, y, x) grid: ``labels`` is the engine's labelmap (1 right lung,
    2 left lung, 3 infection), ``classical`` the classical lung mask, ``missed`` :func:`missed_lung` and
    ``outside`` :func:`lung_outside_classical` where the caller has them already; volumes in mL."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    outside = lung_outside_classical(labels, classical, spacing_zyx) if outside is None else outside
    missed = missed_lung(labels, classical, spacing_zyx) if missed is None else missed
    row: dict[str, float] = {
        "classical_lung_ml": classical.sum() * voxel_ml,
        "outside_classical_ml": outside.sum() * voxel_ml,
        "classical_missed_ml": missed.sum() * voxel_ml,
    }
    with_lung = np.flatnonzero(classical.any(axis=(1, 2)))
    if len(with_lung):
        # Fifths of the classical lung's height; canonical z grows towards the head.
        edges = np.linspace(with_lung[0], with_lung[-1] + 1, 6).round().astype(int)
        row.update(classical_missed_base_ml=missed[edges[0]:edges[1]].sum() * voxel_ml,
                   classical_missed_apex_ml=missed[edges[4]:edges[5]].sum() * voxel_ml)
    if low_slices:
        lowest = labels[:low_slices]  # canonical z grows towards the head
        row.update(low_slices_ml=(lowest > 0).sum() * voxel_ml,
                   low_slices_infection_ml=(lowest == INFECTION).sum() * voxel_ml)
    if nodules is not None:
        count = int(nodules.sum())
        called = int((nodules & (labels == INFECTION)).sum())
        row.update(nodule_voxels=count, nodule_ml=count * voxel_ml, nodule_infection_voxels=called,
                   nodule_infection_percent=100.0 * called / count if count else float("nan"))
    return row


def anatomy_checks_off(settings: PostprocessingSettings | None) -> bool:
    """True for ``WITHOUT_ANATOMY_CHECKS``, whatever its nodule check."""
    return settings is not None and replace(settings, max_nodule_ml=WITHOUT_ANATOMY_CHECKS.max_nodule_ml) == \
        WITHOUT_ANATOMY_CHECKS


def chosen_settings(no_anatomy_checks: bool, no_nodule_check: bool) -> PostprocessingSettings | None:
    """The post-processing settings of ``--no-anatomy-checks`` and ``--no-nodule-check``; None for the engine's
    defaults."""
    if not no_anatomy_checks and not no_nodule_check:
        return None
    settings = WITHOUT_ANATOMY_CHECKS if no_anatomy_checks else PostprocessingSettings()
    return replace(settings, max_nodule_ml=WITHOUT_NODULE_CHECK.max_nodule_ml) if no_nodule_check else settings


def trained_on(model: ModelPackage, scan_name: str) -> bool:
    """True when the model's manifest names the scan in its training data (not a held-out check)."""
    return scan_name in json.dumps(model.manifest.get("training_data", {}))


def check_scan(spec: ScanSpec, model: ModelPackage, device: str, preview_path: Path | None = None, *,
               preview_slices: int = PREVIEW_SLICES, flip_tta: bool = False,
               settings: PostprocessingSettings | None = None, precision: str = "auto") -> dict[str, Any]:
    """Segment one scan as users do (with ``flip_tta`` as ``covidseg segment --flip-tta`` does; ``settings``
    other than the engine's post-processing defaults; ``precision`` as ``covidseg segment --precision``),
    measure it, and write its preview; returns its table row (``network_s``: seconds of preprocessing and
    network)."""
    reads = parse_nodule_xml(spec.nodules) if spec.nodules is not None else None  # bad XML: fail before the work
    result = segment_file(spec.path, model, device=device, flip_tta=flip_tta, settings=settings,
                          precision=precision)
    ct = sitk.Cast(to_canonical(result.input_image), sitk.sitkFloat32)
    volume = sitk.GetArrayFromImage(ct)
    spacing = ct.GetSpacing()[::-1]
    labels = sitk.GetArrayFromImage(to_canonical(result.labelmap))
    classical = classical_lung_mask(volume, spacing)
    nodules, nodule_row, notes = None, {}, [warning.replace(f"{spec.path}: ", "") for warning in result.warnings]
    if reads is not None:
        found = nodule_mask(reads, result.input_image)
        nodules = found.mask
        nodule_row = dict(nodule_readers=reads.readers, nodule_outlines=len(reads.nodules),
                          nodule_contours_unmatched=found.unmatched_contours,
                          nodule_marks_left_out=reads.small_nodule_marks + reads.non_nodule_marks)
        notes.insert(0, f"{reads.readers} readers, {len(reads.nodules)} outlined nodule reads; left out "
                        f"{reads.small_nodule_marks} small-nodule centre marks and {reads.non_nodule_marks} "
                        f"non-nodule marks; {found.unmatched_contours} of {found.contours} contours matched no slice")
    components = infection_components(labels, volume, spacing, nodules)
    outside = lung_outside_classical(labels, classical, spacing)
    outside_components = mask_components(outside, volume, spacing)
    del volume
    missed = missed_lung(labels, classical, spacing)  # for the table and the preview
    m = result.measurements
    row = {
        "right_lung_ml": m.right_lung.lung_ml, "left_lung_ml": m.left_lung.lung_ml, "lung_ml": m.total.lung_ml,
        "infection_ml": m.total.infection_ml,
        **measure_scan(labels, classical, spacing, low_slices=spec.low_slices, nodules=nodules, missed=missed,
                       outside=outside),
        "low_slices": spec.low_slices or "", **nodule_row, "notes": "; ".join(notes),
        "infection_components": len(components),
        "largest_infection_component_ml": components[0]["ml"] if components else 0.0, "components": components,
        "largest_outside_component_ml": outside_components[0]["ml"] if outside_components else 0.0,
        "outside_components": outside_components,
        "flip_tta": "yes" if flip_tta else "no",
        "anatomy_checks": "no" if anatomy_checks_off(settings) else "yes",
        "nodule_check": "no" if settings is not None and settings.max_nodule_ml <= 0 else "yes",
        "precision": result.precision,
        "network_s": result.timings["preprocess_infer"],
    }
    if preview_path is not None:
        write_scan_preview(result, spec, row, labels, classical, missed, nodules, preview_path, preview_slices)
    return row


def write_scan_preview(result: SegmentationResult, spec: ScanSpec, row: dict[str, Any], labels: np.ndarray,
                       classical: np.ndarray, missed: np.ndarray, nodules: np.ndarray | None, path: Path,
                       count: int = PREVIEW_SLICES) -> Path:
    """The engine's preview montage with the classical lung, the part of it the model missed by more than
    5 mm (``missed``) and the nodules outlined, on :func:`preview_slice_indices`. Arrays are canonical."""
    outlines = [Outline("classical HU lung", CLASSICAL_COLOR, classical)]
    if missed.any():
        outlines.append(Outline("classical lung missed >5 mm", MISSED_COLOR, missed))
    if nodules is not None and nodules.any():
        outlines.append(Outline("LIDC nodules", NODULE_COLOR, nodules))
    slices = preview_slice_indices(labels, classical, missed, nodules, count)
    lines = [f"model {result.model_name} {result.model_version}", *summary_lines(row, spec)]
    montage = render_preview(result.input_image, result.labelmap, result.segments, lines,
                             f"{spec.name}: {spec.path.name}", outlines=outlines,
                             slice_indices=slices)
    return write_png(montage, path)


def preview_slice_indices(labels: np.ndarray, classical: np.ndarray, missed: np.ndarray, nodules: np.ndarray | None,
                          count: int = PREVIEW_SLICES) -> list[int]:
    """The preview's slices, superior first: ``count`` spread over the model's and the classical lung, the
    slice where the most classical lung is missed, and each nodule's largest slice."""
    slices = set(choose_preview_slices((labels > 0) | classical, count))
    if missed.any():
        slices.add(int(np.argmax(missed.sum(axis=(1, 2)))))
    if nodules is not None and nodules.any():
        slices |= set(largest_slices(nodules))
    return sorted(slices, reverse=True)


def largest_slices(mask: np.ndarray, most: int = 8) -> list[int]:
    """The slice where each connected component of ``mask`` is largest (the ``most`` largest ones)."""
    components, count = ndimage.label(mask)
    if not count:
        return []
    sizes = np.bincount(components.ravel())[1:]
    chosen = []
    for label in np.argsort(sizes)[::-1][:most] + 1:
        per_slice = (components == label).sum(axis=(1, 2))
        chosen.append(int(np.argmax(per_slice)))
    return chosen


# ------------------------------------------------------------------------------------------ the table

COLUMNS = (
    "scan", "path", "status", "model_name", "model_version", "model_file", "model_trained_on_scan",
    "right_lung_ml", "left_lung_ml", "lung_ml", "infection_ml", "infection_ml_target", "infection_ml_met",
    "classical_lung_ml", "outside_classical_ml", "outside_classical_ml_target", "outside_classical_ml_met",
    "classical_missed_ml", "classical_missed_apex_ml", "classical_missed_base_ml", "low_slices", "low_slices_ml",
    "low_slices_ml_target", "low_slices_ml_met", "low_slices_infection_ml", "nodule_voxels", "nodule_ml", "nodule_infection_voxels",
    "nodule_infection_percent", "nodule_infection_percent_target", "nodule_infection_percent_met",
    "nodule_readers", "nodule_outlines", "nodule_contours_unmatched", "nodule_marks_left_out",
    "infection_components", "largest_infection_component_ml", "largest_outside_component_ml", "notes", "flip_tta",
    "anatomy_checks", "nodule_check", "precision", "network_s",
)


def apply_targets(row: dict[str, Any], targets: Sequence[Target]) -> dict[str, Any]:
    """Add ``<metric>_target`` and ``<metric>_met`` (yes/no) for each target of the scan."""
    for target in targets:
        value = row.get(target.metric)
        row[f"{target.metric}_target"] = target.text()
        if isinstance(value, (int, float)) and not np.isnan(value):
            row[f"{target.metric}_met"] = "yes" if target.met(float(value)) else "no"
    return row


def table_csv(rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row.get(key, "")) for key in COLUMNS})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _cell(row: dict[str, Any], metric: str, digits: int = 1, unit: str = "") -> str:
    value = row.get(metric, "")
    if value == "" or value is None:
        return "-"
    text = f"{value:.{digits}f}{unit}" if isinstance(value, float) else str(value)
    if f"{metric}_target" in row:
        verdict = {"yes": "pass", "no": "**FAIL**"}.get(row.get(f"{metric}_met", ""), "n/a")
        text += f" ({row[f'{metric}_target']}: {verdict})"
    return text


def _missed_cell(row: dict[str, Any]) -> str:
    """Classical lung missed, with its part in the top and bottom fifth of the lung where measured."""
    text = _cell(row, "classical_missed_ml", 0)
    if _has_missed_fifths(row):
        text += f" ({row['classical_missed_apex_ml']:.0f} / {row['classical_missed_base_ml']:.0f})"
    return text


def _has_missed_fifths(row: dict[str, Any]) -> bool:
    """Whether the row splits the classical lung missed into its top and bottom fifth (older tables do not)."""
    return row.get("classical_missed_apex_ml", "") not in ("", None)


def table_markdown(rows: Sequence[dict[str, Any]], header_lines: Sequence[str]) -> str:
    """The Markdown table for a model card: values with issue 10's targets, then definitions and notes."""
    models = ", ".join(dict.fromkeys(_model_text(row) for row in rows))
    lines = [f"# Whole-scan checks: {models}", "", *header_lines, "",
             "| scan | model | lung mL (right / left / total) | infection mL | model lung >5 mm outside "
             "classical, mL | classical lung missed >5 mm, mL (top / bottom fifth) | lowest slices: lung or infection, mL | "
             "nodule voxels called infection, % |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['scan']} | {_model_text(row)} | {row['status']} | | | | | |")
            continue
        lungs = f"{row['right_lung_ml']:.0f} / {row['left_lung_ml']:.0f} / {row['lung_ml']:.0f}"
        low = "-" if not row.get("low_slices") else f"lowest {row['low_slices']}: {_cell(row, 'low_slices_ml')}"
        nodules = "-" if "nodule_voxels" not in row else (
            f"{_cell(row, 'nodule_infection_percent')} of {row['nodule_voxels']} voxels")
        lines.append(f"| {row['scan']} | {_model_text(row)} | {lungs} | {_cell(row, 'infection_ml')} | "
                     f"{_cell(row, 'outside_classical_ml')} | {_missed_cell(row)} | {low} | "
                     f"{nodules} |")
    lines += ["", *kernel_agreement_lines(rows), "", *DEFINITIONS, ""]
    components = {row["scan"]: row["components"] for row in rows if row.get("components")}
    if components:
        lines += ["Infection components (3D, largest first; each scan's five largest, all of at least 0.1 mL in "
                  "`<scan>_infection_components.csv`; slices are canonical, counted from the feet): solid above "
                  "-100 HU, ground glass -750 to -300 HU, aerated below -750 HU.", "",
                  *components_markdown(components), ""]
    outside = {row["scan"]: row["outside_components"] for row in rows if row.get("outside_components")}
    if outside:
        lines += ["Model lung more than 5 mm outside the classical lung, in components (3D, largest first; each "
                  "scan's three largest, all of at least 0.1 mL in `<scan>_outside_components.csv`): a solid one is "
                  "a mass or soft tissue called lung, an aerated one below the lungs gas in the stomach or bowel.", "",
                  *components_markdown(outside, most=3, nodule_column=False), ""]
    if any(row.get("anatomy_checks") == "no" for row in rows):
        lines += ["**Post-processing without its anatomy checks** (`--no-anatomy-checks`: no gas pockets, dense "
                  "false lung, wrapped in tissue or outside air), not as `covidseg segment` runs it.", ""]
    if any(row.get("nodule_check") == "no" for row in rows):
        lines += ["**Post-processing without its nodule check** (`--no-nodule-check`: small solid infection components "
                  "stay infection), not as `covidseg segment` runs it.", ""]
    lines += ["Notes per scan:", ""]
    lines += [f"- {row['scan']}: {row['notes']}" for row in rows if row.get("notes")]
    return "\n".join(lines) + "\n"


def _model_text(row: dict[str, Any]) -> str:
    text = f"{row.get('model_name', '?')} {row.get('model_version', '')}".strip()
    return text + (" (**trained on this scan**)" if row.get("model_trained_on_scan") == "yes" else "")


DEFINITIONS = [
    "Definitions: the engine runs as `covidseg segment` does (`pipeline.segment_file`, default post-processing); "
    "lung mL include the infection inside the lungs; \"model lung\" is every labelled voxel. The classical "
    "lung is `classical_lung.classical_lung_mask` on the HU volume (air below -320 HU inside the body, gas "
    "pockets cut out, components above the diaphragm, the trachea and main bronchi taken out even where they are not pure "
    "gas; tables before 2026-12-04 16:00 UTC count kernel B's and LIDC-IDRI-0003's trachea as lung). Distances are 3D Euclidean in mm at the voxel "
    "spacing. Top and bottom fifth: of the classical lung's height (apex, bases). On covid-chest-ct the classical mask leaves out dense consolidation (it takes air below -320 HU), "
    "so model lung outside it there is partly real, infected lung; its false lung is measured in its lowest "
    "slices instead. \"Lowest slices\": lung or infection in the scan's N lowest axial slices (covid-chest-ct: 17, "
    "stomach and bowel, no lung). Nodules: the union of all LIDC readers' outlined nodules (inclusion "
    "contours filled, boundary included), matched to slices by z position. Targets are issue 10's; the "
    "abdominal scans have none there (their README: little or no lung, no infection).",
]


def kernel_agreement_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Issue 10's check that both example-chest-ct kernels give the same total lung (within 3%)."""
    by_name = {row["scan"]: row for row in rows if row["status"] == "ok"}
    if not all(name in by_name for name in KERNEL_PAIR):
        return []
    first, second = (by_name[name]["lung_ml"] for name in KERNEL_PAIR)
    difference = 100.0 * abs(first - second) / max(min(first, second), 1e-9)
    verdict = "pass" if difference <= KERNEL_AGREEMENT_PERCENT else "**FAIL**"
    return [f"example-chest-ct kernels L and B: total lung {first:.0f} and {second:.0f} mL, {difference:.1f}% apart "
            f"(of the smaller; target within {KERNEL_AGREEMENT_PERCENT:g}%: {verdict})."]


def summary_lines(row: dict[str, Any], spec: ScanSpec) -> list[str]:
    """Short lines for the preview's header."""
    missed = f"classical missed >5 mm {row['classical_missed_ml']:.0f} mL"
    if _has_missed_fifths(row):
        missed += (f" (top fifth {row['classical_missed_apex_ml']:.0f}, "
                   f"bottom fifth {row['classical_missed_base_ml']:.0f})")
    lines = [f"lung {row['lung_ml']:.0f} mL (R {row['right_lung_ml']:.0f} / L {row['left_lung_ml']:.0f}), "
             f"infection {_cell(row, 'infection_ml')} mL",
             f"model lung >5 mm outside classical {_cell(row, 'outside_classical_ml')} mL; {missed}"]
    if spec.low_slices:
        lines.append(f"lowest {spec.low_slices} slices: lung or infection {_cell(row, 'low_slices_ml')} mL")
    if "nodule_voxels" in row:
        lines.append(f"nodules {row['nodule_voxels']} voxels, called infection "
                     f"{_cell(row, 'nodule_infection_percent')} %")
    return [line.replace("**", "") for line in lines]


def machine_lines(argv: Sequence[str], device: str, note: str, precision: str) -> list[str]:
    """Where and how the table was made: command, date, CPU, threads, device, precision."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = "python -m covidseg_training wholescan " + shlex.join(argv)
    return [
        f"Command: `{command.strip()}` (from `training/`), "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {cpu_name()}, {cores} cores available, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, device {device}, precision {precision}"
        + (f"; {note}" if note else "") + ".",
    ]


def display_path(path: str | Path) -> str:
    """A path relative to the repository root when it lies beside or inside it (as the docs write
    ``../shared/data``), else as given."""
    path = Path(path).resolve()
    for base, prefix in ((REPO, ""), (REPO.parent, "../")):
        try:
            return prefix + path.relative_to(base).as_posix()
        except ValueError:
            continue
    return str(path)


# ---------------------------------------------------------------------------------------------- CLI


def _pairs(values: Sequence[str], option: str, convert: Callable[[str], Any] = str) -> dict[str, Any]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"{option} {value!r}: expected NAME=VALUE")
        try:
            pairs[name] = convert(rest)
        except ValueError as error:
            raise SystemExit(f"{option} {value!r}: {error}") from error
    return pairs


def select_scans(args: argparse.Namespace) -> list[ScanSpec]:
    """The scans of ``--scan`` (default: every shared scan) with their per-scan settings."""
    root = Path(args.data).expanduser()
    if not args.scan:
        if not root.is_dir():
            raise SystemExit(f"{root}: the shared data folder is not here; pass --data DIR or --scan NAME=PATH")
        specs = [default_scan(name, root) for name in DEFAULT_SCANS]
    else:
        specs = []
        for value in args.scan:
            name, sep, path = value.partition("=")
            if not sep and value in DEFAULT_SCANS:
                specs.append(default_scan(value, root))
            elif sep:
                spec = default_scan(name, root) if name in DEFAULT_SCANS else ScanSpec(name, Path(path))
                spec.path = Path(path).expanduser()
                specs.append(spec)
            else:
                path = Path(value).expanduser()
                specs.append(ScanSpec(path.name.split(".")[0] or value, path))
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise SystemExit(f"--scan: the same scan name twice in {names}")
    by_name = {spec.name: spec for spec in specs}
    for option, values in (("--low-slices", _pairs(args.low_slices, "--low-slices", int)),
                           ("--nodules", _pairs(args.nodules, "--nodules")),
                           ("--model-for", _pairs(args.model_for, "--model-for"))):
        unknown = sorted(set(values) - set(by_name))
        if unknown:
            raise SystemExit(f"{option}: no scan named {', '.join(unknown)} (scans: {', '.join(names)})")
        for name, value in values.items():
            if option == "--low-slices":
                if value < 0:
                    raise SystemExit(f"--low-slices {name}={value}: a number of slices, 0 or more")
                by_name[name].low_slices = value
            elif option == "--nodules":
                by_name[name].nodules = Path(value).expanduser()
    return specs


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m covidseg_training wholescan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for wholescan.csv, wholescan.md and the PNGs")
    parser.add_argument("--model", default=None, help="model manifest .json or .pt (default: the bundled model)")
    parser.add_argument("--model-for", action="append", default=[], metavar="SCAN=PATH",
                        help="a model for one scan (a fold model that did not train on it); repeatable")
    parser.add_argument("--scan", action="append", default=[], metavar="NAME | NAME=PATH | PATH",
                        help=f"a scan to check (repeatable); default: all of {', '.join(DEFAULT_SCANS)}")
    parser.add_argument("--data", default=str(SHARED_DATA), help="the shared data folder (default: %(default)s)")
    parser.add_argument("--low-slices", action="append", default=[], metavar="SCAN=N",
                        help="measure lung and infection in the scan's N lowest slices (covid-chest-ct: 17)")
    parser.add_argument("--nodules", action="append", default=[], metavar="SCAN=XML",
                        help="LIDC nodule XML of a scan (the LIDC scans' own by default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the network's arithmetic, as covidseg segment --precision (default auto: bf16 on a "
                             "CPU with native bf16, else fp32; tables compared across machines want one of them)")
    parser.add_argument("--preview-slices", type=int, default=PREVIEW_SLICES, choices=range(1, 65), metavar="N",
                        help="slices per montage, 1 to 64, besides each nodule's largest slice (default %(default)s)")
    parser.add_argument("--note", default="", help="added to the table's machine line (e.g. 'shared, busy CPU')")
    parser.add_argument("--flip-tta", action="store_true",
                        help="segment with flip test-time augmentation (covidseg segment --flip-tta)")
    parser.add_argument("--no-anatomy-checks", action="store_true",
                        help="post-process without the anatomy checks (gas pockets, dense false lung, wrapped in "
                             "tissue, outside air), to measure what they do")
    parser.add_argument("--no-nodule-check", action="store_true",
                        help="post-process without the nodule check (small solid infection components become "
                             "lung), to measure what it does")
    return parser.parse_args(list(argv))


def run_one(spec: ScanSpec, model: ModelPackage, model_path: str | None, device: str, out: Path, *,
            preview_slices: int = PREVIEW_SLICES, flip_tta: bool = False,
            settings: PostprocessingSettings | None = None, precision: str = "auto") -> dict[str, Any]:
    """One scan's row (a failure is a row too), its targets, and its record ``<scan>.json`` in ``out``."""
    row: dict[str, Any] = {
        "scan": spec.name, "path": display_path(spec.path), "model_name": model.name,
        "model_version": model.version, "model_file": display_path(model_path or default_model_path()),
        "model_trained_on_scan": "yes" if trained_on(model, spec.name) else "no",
    }
    try:
        row.update(check_scan(spec, model, device, out / f"{spec.name}.png", preview_slices=preview_slices,
                              flip_tta=flip_tta, settings=settings, precision=precision), status="ok")
    except (InputError, ValueError, OSError) as error:
        row.update(status=f"failed: {error}")
    apply_targets(row, spec.targets)
    if row["status"] == "ok":
        write_text_atomic(out / f"{spec.name}_infection_components.csv", components_csv(row["components"]))
        write_text_atomic(out / f"{spec.name}_outside_components.csv", components_csv(row["outside_components"]))
    write_text_atomic(out / f"{spec.name}.json", json.dumps(row, indent=2, default=str) + "\n")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    specs = select_scans(args)
    try:
        device = str(pick_device(args.device))
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"--device: {error}") from error
    try:
        precision = pick_precision(args.precision, torch.device(device))
    except (RuntimeError, ValueError) as error:
        raise SystemExit(f"--precision: {error}") from error
    model_for = _pairs(args.model_for, "--model-for")
    model_paths = {spec.name: model_for.get(spec.name, args.model) for spec in specs}
    models: dict[str, ModelPackage] = {}
    try:
        for path in dict.fromkeys(model_paths.values()):
            models[str(path)] = load_model_package(path)
    except ModelError as error:
        raise SystemExit(f"model: {error}") from error
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--out: cannot create {out}: {error}") from error
    settings = chosen_settings(args.no_anatomy_checks, args.no_nodule_check)
    rows: list[dict[str, Any]] = []
    try:
        for index, spec in enumerate(specs, 1):
            model = models[str(model_paths[spec.name])]
            print(f"[{index}/{len(specs)}] {spec.name}: {spec.path} with {model.name} {model.version}", flush=True)
            row = run_one(spec, model, model_paths[spec.name], device, out, preview_slices=args.preview_slices,
                          flip_tta=args.flip_tta, settings=settings,
                          precision=precision)
            print(f"    {row['status']}" + ("" if row["status"] != "ok" else
                  f": lung {row['lung_ml']:.0f} mL, infection {row['infection_ml']:.1f} mL, outside classical "
                  f"{row['outside_classical_ml']:.1f} mL, missed {row['classical_missed_ml']:.1f} mL"), flush=True)
            rows.append(row)
    except KeyboardInterrupt:
        print(f"cancelled after {len(rows)} of {len(specs)} scans: their records are in {out}/<scan>.json; "
              "the table was not written", file=sys.stderr)
        return 130
    write_text_atomic(out / "wholescan.csv", table_csv(rows))
    write_text_atomic(out / "wholescan.md", table_markdown(rows, machine_lines(argv, device, args.note, precision)))
    previews = sum(row["status"] == "ok" for row in rows)
    print(f"wrote {out / 'wholescan.md'}, {out / 'wholescan.csv'} and {previews} previews (<scan>.png) in {out}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
