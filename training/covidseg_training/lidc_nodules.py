"""LIDC-IDRI nodule reads (the radiologists' XML) as a voxel mask on the scan's grid.

The XML (namespace ``http://www.nih.gov``) holds one ``readingSession`` per radiologist. What counts
here as a nodule:

- every ``unblindedReadNodule`` whose contours outline it (nodules of 3 mm or more): each ``roi`` is
  one slice's contour, ``edgeMap`` points are the DICOM slice's pixel column (``xCoord``) and row
  (``yCoord``), filled as a polygon with the boundary pixels included; an ``roi`` with inclusion
  ``FALSE`` is a hole in that reader's nodule on that slice and is cut out of it;
- the nodule mask is the union over all readers and nodules (any reader's outline counts).

Left out, and counted so a report can say so: reads that only mark a small nodule's centre (under
3 mm: every ``roi`` a single ``edgeMap`` point, no outline to fill) and ``nonNodule`` marks (lesions
the reader judged not to be nodules).

Slices are matched by ``imageZposition`` against each slice's physical z position (the image's
geometry), within half a slice; a contour farther than that from every slice is counted as unmatched.
The shared LIDC NIfTI files were written from the DICOM series with identity direction (LPS), so
their i, j indices are the DICOM column and row.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.draw import polygon

from CovidInfectionSegLib.imageio import to_canonical

NAMESPACE = {"lidc": "http://www.nih.gov"}


@dataclass(frozen=True)
class Contour:
    """One slice of one reader's nodule outline: z position (mm) and (column, row) pixel points."""

    z_mm: float
    points: np.ndarray  # (N, 2) int: column (x), row (y)
    inclusion: bool


@dataclass(frozen=True)
class NoduleRead:
    """One radiologist's outline of one nodule."""

    reader: int
    nodule_id: str
    contours: tuple[Contour, ...]


@dataclass
class NoduleReads:
    """The outlined nodules of a scan's XML, and how many marks were left out (see the module doc)."""

    nodules: list[NoduleRead] = field(default_factory=list)
    small_nodule_marks: int = 0
    non_nodule_marks: int = 0
    readers: int = 0


def parse_nodule_xml(path: str | Path) -> NoduleReads:
    """Read an LIDC XML file; raises ``ValueError`` naming the file when it is not LIDC XML."""
    path = Path(path)
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"{path}: not readable XML ({error})") from error
    if root.tag != f"{{{NAMESPACE['lidc']}}}LidcReadMessage":
        raise ValueError(f"{path}: not an LIDC read message (root element {root.tag!r})")
    reads = NoduleReads()
    for reader, session in enumerate(root.findall("lidc:readingSession", NAMESPACE)):
        reads.readers += 1
        reads.non_nodule_marks += len(session.findall("lidc:nonNodule", NAMESPACE))
        for nodule in session.findall("lidc:unblindedReadNodule", NAMESPACE):
            contours = tuple(_contour(roi, path) for roi in nodule.findall("lidc:roi", NAMESPACE))
            if all(len(contour.points) <= 1 for contour in contours):
                reads.small_nodule_marks += 1
                continue
            nodule_id = (nodule.findtext("lidc:noduleID", "", NAMESPACE) or "").strip()
            reads.nodules.append(NoduleRead(reader, nodule_id, contours))
    return reads


def _contour(roi: ElementTree.Element, path: Path) -> Contour:
    try:
        z_mm = float(roi.findtext("lidc:imageZposition", "", NAMESPACE))
        points = np.array([[int(edge.findtext("lidc:xCoord", "", NAMESPACE)),
                            int(edge.findtext("lidc:yCoord", "", NAMESPACE))]
                           for edge in roi.findall("lidc:edgeMap", NAMESPACE)], dtype=int).reshape(-1, 2)
    except ValueError as error:
        raise ValueError(f"{path}: a nodule contour without a readable z position or point ({error})") from error
    inclusion = (roi.findtext("lidc:inclusion", "TRUE", NAMESPACE) or "TRUE").strip().upper() == "TRUE"
    return Contour(z_mm, points, inclusion)


@dataclass
class NoduleMask:
    """The union of the outlined nodules on the canonical LPS (z, y, x) grid, and the contours that
    lay more than half a slice from every slice."""

    mask: np.ndarray
    unmatched_contours: int
    contours: int


def nodule_mask(reads: NoduleReads, image: sitk.Image) -> NoduleMask:
    """Fill the nodules of ``reads`` on ``image``'s grid (the scan the XML belongs to, as read) and
    return them on the canonical LPS grid (:func:`imageio.to_canonical`), like the engine's arrays."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction[:, 2]), [0, 0, 1], atol=1e-3):
        raise ValueError("nodule contours need axial slices (the image's third axis along z); "
                         f"this image's direction is {tuple(np.round(direction.ravel(), 3))}")
    columns, rows, slices = image.GetSize()
    slice_z = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(slices)])
    half_slice = image.GetSpacing()[2] / 2.0
    mask = np.zeros((slices, rows, columns), dtype=bool)  # (k, j, i) on the image's own grid
    unmatched = total = 0
    for read in reads.nodules:
        outline = {}
        for contour in read.contours:
            total += 1
            k = int(np.argmin(np.abs(slice_z - contour.z_mm)))
            if abs(slice_z[k] - contour.z_mm) > half_slice:
                unmatched += 1
                continue
            filled = outline.setdefault(k, np.zeros((rows, columns), dtype=bool))
            area = fill_contour(contour.points, (rows, columns))
            outline[k] = (filled | area) if contour.inclusion else (filled & ~area)
        for k, filled in outline.items():
            mask[k] |= filled
    labels = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels.CopyInformation(image)
    canonical = sitk.GetArrayFromImage(to_canonical(labels)).astype(bool)
    return NoduleMask(canonical, unmatched, total)


def fill_contour(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (rows, columns) mask of the polygon through ``points`` (column, row), boundary included."""
    area = np.zeros(shape, dtype=bool)
    if not len(points):
        return area
    rr, cc = polygon(points[:, 1], points[:, 0], shape)
    area[rr, cc] = True
    inside = (points[:, 1] >= 0) & (points[:, 1] < shape[0]) & (points[:, 0] >= 0) & (points[:, 0] < shape[1])
    area[points[inside, 1], points[inside, 0]] = True
    return area
