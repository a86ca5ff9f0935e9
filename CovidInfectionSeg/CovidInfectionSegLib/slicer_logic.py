"""MRML logic of the CovidInfectionSeg module: a CT volume node in, a segmentation node and a table node out.

Uses only MRML/VTK classes (``slicer.vtkMRML*``, ``slicer.vtkSegment``, ``slicer.util.arrayFromVolume``), so
it runs inside the Slicer application and under plain Python with the ``slicer-core`` package; nothing here
needs ``slicer.app``, ``slicer.modules`` or Qt. A segmentation has three steps:

1. :meth:`SegmentationLogic.prepareInput` (main thread): copy the voxels and IJK-to-RAS geometry of the
   volume node into a SimpleITK image (LPS, what the engine expects). Touches MRML read-only.
2. :meth:`SegmentationLogic.compute` (any thread): the engine, :func:`pipeline.segment_image`. No MRML.
3. :meth:`SegmentationLogic.apply` (main thread): create or fill the segmentation node and measurement
   table. Nothing is added to the scene before this step, and if it fails everything it added is removed
   and a reused segmentation gets its previous segments back, so errors and cancelling leave the scene as
   it was.

:meth:`SegmentationLogic.process` runs the three in a row (scripts, the Python console);
:class:`SegmentationJob` runs step 2 in a worker thread for the module panel.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from .atomic import atomic_path
from .measurements import Measurements, RegionMeasurement
from .model_package import ModelPackage, SegmentInfo, load_model_package
from .outputs import ANATOMIC_CONTEXT, TERMINOLOGY_CONTEXT
from .pipeline import SegmentationCancelled, SegmentationResult, segment_image
from .validation import InputError

__all__ = [
    "SegmentationLogic",
    "SegmentationJob",
    "AppliedSegmentation",
    "SegmentationCancelled",
    "volumeNodeToImage",
    "imageToVolumeNode",
    "saveSegmentation",
    "buildSegments",
    "MEASUREMENT_COLUMNS",
]

ProgressCallback = Callable[[int, int], None]
CancelCheck = Union[Callable[[], bool], threading.Event]
ModelSpec = Optional[Union[ModelPackage, str, Path]]

# RAS (Slicer) <-> LPS (ITK, DICOM): flip the first two axes.
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MAX_DIRECTION_SKEW = 1e-4
BINARY_LABELMAP = "Binary labelmap"
# Node reference from the segmentation to its measurement table, so a re-run updates the same table.
MEASUREMENTS_REFERENCE_ROLE = "CovidInfectionSegMeasurements"
ATTRIBUTE_PREFIX = "CovidInfectionSeg."
# (column name, title, unit, VTK array class, description); one row per region.
MEASUREMENT_COLUMNS = (
    ("region", "Region", "", vtk.vtkStringArray, "Right lung, left lung or both lungs"),
    ("lung_ml", "Lung volume", "mL", vtk.vtkDoubleArray, "Lung volume including the infection inside it"),
    ("infection_ml", "Infection volume", "mL", vtk.vtkDoubleArray, "Volume segmented as infection"),
    ("percent_infected", "Infected", "%", vtk.vtkDoubleArray, "Infection volume / lung volume x 100"),
    ("grade", "Severity grade", "", vtk.vtkIntArray, "0 none, 1 minimal (<5%), 2 mild (5-25%), 3 moderate "
     "(25-50%), 4 severe (50-75%), 5 critical (>=75%)"),
    ("grade_name", "Grade", "", vtk.vtkStringArray, "Name of the severity grade"),
)
REGION_TITLES = (("right_lung", "Right lung"), ("left_lung", "Left lung"), ("total", "Both lungs"))


@dataclass
class AppliedSegmentation:
    """What :meth:`SegmentationLogic.apply` put into the scene, with the engine result it came from."""

    segmentationNode: Any
    tableNode: Any
    result: SegmentationResult
    createdNodeIDs: list[str] = field(default_factory=list)

    @property
    def measurements(self) -> Measurements:
        return self.result.measurements

    @property
    def warnings(self) -> list[str]:
        return self.result.warnings


# ------------------------------------------------------------------------------------ MRML -> SimpleITK


def volumeNodeToImage(volumeNode: Any) -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image with the same physical geometry (LPS).

    The voxel array is copied, so the result is safe to use from another thread while the scene
    changes. The node's parent transform is not applied: the output is placed under the same
    transform. Raises :class:`InputError` for an empty, 2D, multi-component or sheared volume.
    """
    name = _nodeLabel(volumeNode)
    if volumeNode is None:
        raise InputError("no input volume selected")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{name}: is a {volumeNode.GetClassName()}; need a scalar CT volume (vtkMRMLScalarVolumeNode)")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise InputError(f"{name}: the volume has no voxels (empty image data)")
    components = imageData.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(f"{name}: {components} components per voxel; need a single-channel (grey-scale) CT volume")
    dimensions = imageData.GetDimensions()
    if min(dimensions) <= 1:
        size = " x ".join(str(d) for d in dimensions)
        raise InputError(f"{name}: a 2D image (size {size}); need a 3D CT volume with many axial slices")

    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    ijkToLps = LPS_FROM_RAS @ slicer.util.arrayFromVTKMatrix(ijkToRas)
    spacing = np.linalg.norm(ijkToLps[:3, :3], axis=0)
    direction = ijkToLps[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() > MAX_DIRECTION_SKEW:
        raise InputError(f"{name}: the IJK-to-RAS matrix is sheared (axes not perpendicular); resample the volume first")

    image = sitk.GetImageFromArray(np.array(slicer.util.arrayFromVolume(volumeNode), copy=True))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(v) for v in ijkToLps[:3, 3]))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def imageToVolumeNode(image: sitk.Image, scene: Any, name: str) -> Any:
    """Add a scalar volume node holding ``image`` (voxels and physical geometry) to ``scene``.

    The inverse of :func:`volumeNodeToImage`; used by the batch script to load scans the same way
    inside Slicer and under plain Python. Raises :class:`InputError` for images that are not 3D scalar.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name}: a {image.GetDimension()}D image with {image.GetNumberOfComponentsPerPixel()} components "
            "per voxel; need one 3D single-channel CT volume"
        )
    array = sitk.GetArrayViewFromImage(image)
    imageData = vtk.vtkImageData()
    imageData.SetDimensions(*image.GetSize())
    imageData.AllocateScalars(numpy_support.get_vtk_array_type(array.dtype), 1)
    numpy_support.vtk_to_numpy(imageData.GetPointData().GetScalars())[:] = array.ravel()
    ijkToLps = np.eye(4)
    ijkToLps[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) @ np.diag(image.GetSpacing())
    ijkToLps[:3, 3] = image.GetOrigin()
    ijkToRas = vtk.vtkMatrix4x4()
    slicer.util.updateVTKMatrixFromArray(ijkToRas, LPS_FROM_RAS @ ijkToLps)  # the flip is its own inverse

    volumeNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    volumeNode.SetIJKToRASMatrix(ijkToRas)
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.CreateDefaultDisplayNodes()
    return volumeNode


# ------------------------------------------------------------------------------ result -> vtkSegment


def terminologyString(terminology: dict[str, Sequence[str]]) -> str:
    """Manifest terminology (code triplets [scheme, value, meaning]) -> Slicer's serialized terminology entry."""
    empty = ("", "", "")

    def triplet(key: str) -> tuple[str, str, str]:
        scheme, value, meaning = terminology.get(key) or empty
        return str(value), str(scheme), str(meaning)  # the serializer wants value, scheme, meaning

    region = terminology.get("anatomic_region")
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT,
        *triplet("category"),
        *triplet("type"),
        *triplet("type_modifier"),
        ANATOMIC_CONTEXT if region else "",
        *triplet("anatomic_region"),
        *triplet("anatomic_region_modifier"),
    )


def segmentId(segment: SegmentInfo) -> str:
    """Stable segment ID from the segment name ("Right lung" -> "Right_lung")."""
    return segment.name.replace(" ", "_")


def buildSegments(labelmap: sitk.Image, segments: Sequence[SegmentInfo], ijkToRas: vtk.vtkMatrix4x4) -> list[Any]:
    """One ``vtkSegment`` per manifest segment, all sharing one labelmap layer (label value = segment value).

    ``labelmap`` must be on the grid of the volume whose IJK-to-RAS matrix is ``ijkToRas`` (what
    :func:`pipeline.segment_image` returns for :func:`volumeNodeToImage`'s image). Plain VTK: no scene.
    """
    array = sitk.GetArrayViewFromImage(labelmap)
    sharedLabelmap = slicer.vtkOrientedImageData()
    depth, rows, columns = array.shape
    sharedLabelmap.SetDimensions(columns, rows, depth)
    sharedLabelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(sharedLabelmap.GetPointData().GetScalars())[:] = array.astype(np.uint8).ravel()
    sharedLabelmap.SetImageToWorldMatrix(ijkToRas)

    vtkSegments = []
    for info in segments:
        segment = slicer.vtkSegment()
        segment.SetName(info.name)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*info.color_float)
        segment.SetColorAutoGenerated(False)
        segment.SetLabelValue(int(info.value))
        if info.terminology:
            segment.SetTerminology(terminologyString(info.terminology))
        segment.AddRepresentation(BINARY_LABELMAP, sharedLabelmap)
        vtkSegments.append(segment)
    return vtkSegments


# ------------------------------------------------------------------------------------------- logic


class SegmentationLogic:
    """Segment lungs and COVID-19 infection of a CT volume node into a segmentation node.

    >>> logic = SegmentationLogic()
    >>> applied = logic.process(volumeNode)          # blocking; bundled model, auto device
    >>> applied.segmentationNode, applied.measurements.total.percent_infected
    """

    def __init__(self, model: ModelSpec = None):
        """``model``: a loaded :class:`ModelPackage`, a manifest/.pt path, or None for the bundled model."""
        self._modelSpec = model
        self._model: ModelPackage | None = model if isinstance(model, ModelPackage) else None
        self._modelLock = threading.Lock()

    # ---- model

    def model(self, model: ModelSpec = None) -> ModelPackage:
        """The model package to use (loaded and verified on first use, then cached). Thread-safe."""
        if isinstance(model, ModelPackage):
            return model
        if model is not None:
            return load_model_package(model)
        with self._modelLock:
            if self._model is None:
                self._model = load_model_package(self._modelSpec)
            return self._model

    # ---- the three steps

    def prepareInput(self, inputVolume: Any) -> sitk.Image:
        """Step 1 (main thread): the volume node as a SimpleITK image; see :func:`volumeNodeToImage`."""
        return volumeNodeToImage(inputVolume)

    def compute(
        self,
        image: sitk.Image,
        *,
        device: str = "auto",
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        model: ModelSpec = None,
        name: str = "input volume",
    ) -> SegmentationResult:
        """Step 2 (any thread): run the engine on a prepared image. Raises InputError, ModelError,
        SegmentationCancelled or RuntimeError (device); touches no MRML node."""
        return segment_image(
            image, self.model(model), device=device, batch_size=batch_size, progress=progress, cancel=cancel, name=name
        )

    def apply(self, result: SegmentationResult, inputVolume: Any, outputSegmentation: Any = None) -> AppliedSegmentation:
        """Step 3 (main thread): put ``result`` into the scene of ``inputVolume``.

        ``outputSegmentation`` None creates a new segmentation node next to the input; an existing node
        has all its segments replaced. The measurement table is the one referenced by the segmentation
        (from an earlier run) or a new one. On failure the scene is restored and the error re-raised.
        """
        scene = inputVolume.GetScene()
        if scene is None:
            raise InputError(f"{_nodeLabel(inputVolume)}: the volume node is not in a scene")
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        segments = buildSegments(result.labelmap, result.segments, ijkToRas)

        created: list[Any] = []
        previousSegments: list[tuple[str, Any]] | None = None
        try:
            segmentationNode = outputSegmentation
            if segmentationNode is None:
                name = scene.GenerateUniqueName(f"{inputVolume.GetName()} lungs and infection")
                segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
                created.append(segmentationNode)
            else:
                previousSegments = _detachSegments(segmentationNode)
            _fillSegmentationNode(segmentationNode, inputVolume, result, segments)
            if segmentationNode.GetDisplayNode() is None:
                segmentationNode.CreateDefaultDisplayNodes()
                created.append(segmentationNode.GetDisplayNode())

            tableNode = segmentationNode.GetNodeReference(MEASUREMENTS_REFERENCE_ROLE)
            if tableNode is None:
                tableName = scene.GenerateUniqueName(f"{segmentationNode.GetName()} measurements")
                tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", tableName)
                created.append(tableNode)
                segmentationNode.SetNodeReferenceID(MEASUREMENTS_REFERENCE_ROLE, tableNode.GetID())
            fillMeasurementTable(tableNode, result.measurements)
            _placeNextTo(scene, inputVolume, [node for node in (segmentationNode, tableNode) if node in created])
        except BaseException:
            for node in reversed(created):
                if node is not None and node.GetScene() is scene:
                    scene.RemoveNode(node)
            if previousSegments is not None:
                _restoreSegments(outputSegmentation, previousSegments)
            raise
        return AppliedSegmentation(segmentationNode, tableNode, result, [n.GetID() for n in created if n is not None])

    # ---- conveniences

    def process(
        self,
        inputVolume: Any,
        outputSegmentation: Any = None,
        device: str = "auto",
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelCheck | None = None,
        model: ModelSpec = None,
    ) -> AppliedSegmentation:
        """Segment ``inputVolume`` and fill ``outputSegmentation`` (new node if None); blocking.

        Returns the nodes and the engine result (``.measurements``, ``.warnings``). Raises InputError,
        ModelError, SegmentationCancelled or RuntimeError; the scene is unchanged when it raises.
        """
        image = self.prepareInput(inputVolume)
        result = self.compute(
            image, device=device, batch_size=batch_size, progress=progress, cancel=cancel, model=model,
            name=_nodeLabel(inputVolume),
        )
        return self.apply(result, inputVolume, outputSegmentation)

    def startJob(
        self, inputVolume: Any, device: str = "auto", batch_size: int | None = None, model: ModelSpec = None
    ) -> "SegmentationJob":
        """Prepare ``inputVolume`` here (main thread) and start the computation in a worker thread."""
        image = self.prepareInput(inputVolume)
        job = SegmentationJob(self, image, device=device, batch_size=batch_size, model=model, name=_nodeLabel(inputVolume))
        job.start()
        return job

    @staticmethod
    def showIn3D(segmentationNode: Any) -> None:
        """Build the closed-surface representation so the segments show in 3D views."""
        segmentationNode.CreateClosedSurfaceRepresentation()
        displayNode = segmentationNode.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetVisibility3D(True)


class SegmentationJob:
    """One :meth:`SegmentationLogic.compute` running in a worker thread.

    The main thread polls ``slicesDone``/``slicesTotal``/``finished`` (e.g. from a Qt timer), may call
    :meth:`cancel` (checked between slice batches), and when ``finished`` either reads ``error`` or
    passes ``result`` to :meth:`SegmentationLogic.apply`. Torch releases the GIL in its kernels, so
    the GUI stays responsive while the job runs.
    """

    def __init__(self, logic: SegmentationLogic, image: sitk.Image, **computeOptions: Any):
        self._logic = logic
        self._image = image
        self._options = computeOptions
        self._cancelEvent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="CovidInfectionSeg-compute", daemon=True)
        self.slicesDone = 0
        self.slicesTotal = 0
        self.result: SegmentationResult | None = None
        self.error: BaseException | None = None
        self.startTime = 0.0
        self.endTime: float | None = None

    def start(self) -> None:
        self.startTime = time.monotonic()
        self._thread.start()

    def cancel(self) -> None:
        """Ask the worker to stop after the slice batch in flight."""
        self._cancelEvent.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the worker ends (or ``timeout`` seconds); True when it has ended."""
        self._thread.join(timeout)
        return self.finished

    @property
    def finished(self) -> bool:
        return self.endTime is not None and not self._thread.is_alive()

    @property
    def cancelRequested(self) -> bool:
        return self._cancelEvent.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, SegmentationCancelled)

    @property
    def elapsedSeconds(self) -> float:
        return (self.endTime or time.monotonic()) - self.startTime if self.startTime else 0.0

    def _progress(self, done: int, total: int) -> None:
        self.slicesDone, self.slicesTotal = done, total

    def _run(self) -> None:
        try:
            self.result = self._logic.compute(self._image, progress=self._progress, cancel=self._cancelEvent, **self._options)
        except BaseException as error:  # reported to the main thread, which decides what to show
            self.error = error
        finally:
            self._image = None  # the copy of the input is no longer needed
            self.endTime = time.monotonic()


# ------------------------------------------------------------------------------------------ helpers


def fillMeasurementTable(tableNode: Any, measurements: Measurements) -> None:
    """Replace the table's content by one row per region (right lung, left lung, both lungs)."""
    wasModifying = tableNode.StartModify()
    tableNode.RemoveAllColumns()
    rows: list[tuple[str, RegionMeasurement]] = [(title, measurements.region(key)) for key, title in REGION_TITLES]
    for name, title, unit, arrayClass, description in MEASUREMENT_COLUMNS:
        column = arrayClass()
        column.SetName(name)
        for regionTitle, region in rows:
            value = regionTitle if name == "region" else region.to_dict()[name]
            column.InsertNextValue(value)
        tableNode.AddColumn(column)
        tableNode.SetColumnTitle(name, title)
        tableNode.SetColumnDescription(name, description)
        if unit:
            tableNode.SetColumnUnitLabel(name, unit)
    tableNode.SetUseColumnTitleAsColumnHeader(True)
    tableNode.SetLocked(True)
    tableNode.EndModify(wasModifying)


def measurementsFromTable(tableNode: Any) -> dict[str, dict[str, Any]]:
    """The table's rows back as ``{region title: {column name: value}}`` (for checks and scripts)."""
    table = tableNode.GetTable()
    names = [table.GetColumn(index).GetName() for index in range(table.GetNumberOfColumns())]
    rows = {}
    for row in range(table.GetNumberOfRows()):
        values = {name: table.GetValue(row, index).ToString() if name in ("region", "grade_name")
                  else table.GetValue(row, index).ToDouble() for index, name in enumerate(names)}
        rows[values.pop("region")] = values
    return rows


def saveSegmentation(segmentationNode: Any, path: str | Path) -> Path:
    """Write a segmentation node as a ``.seg.nrrd`` with MRML's own writer (what Slicer's Save uses).

    Written under a temporary name and renamed when complete; the scene gets no storage node.
    Raises OSError naming the file when the writer fails.
    """
    path = Path(path)
    if not path.name.endswith(".seg.nrrd"):
        raise ValueError(f"{path}: a segmentation file name must end with .seg.nrrd")
    storageNode = segmentationNode.CreateDefaultStorageNode()
    storageNode.UnRegister(None)  # the caller owns the new object; now the Python variable does
    with atomic_path(path) as temporary:
        storageNode.SetFileName(str(temporary))
        if not storageNode.WriteData(segmentationNode):
            raise OSError(f"{path}: MRML could not write the segmentation")
    return path


def _fillSegmentationNode(segmentationNode: Any, inputVolume: Any, result: SegmentationResult, segments: list[Any]) -> None:
    """Geometry, segments, transform and provenance attributes of the output, in one Modified event."""
    wasModifying = segmentationNode.StartModify()
    try:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation = segmentationNode.GetSegmentation()
        setSource = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
        setSource(BINARY_LABELMAP)  # "Master" before Slicer 5.4
        for info, segment in zip(result.segments, segments):
            segmentation.AddSegment(segment, segmentId(info))
        segmentationNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        _setResultAttributes(segmentationNode, result)
    finally:
        segmentationNode.EndModify(wasModifying)


def _setResultAttributes(segmentationNode: Any, result: SegmentationResult) -> None:
    segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + "model", f"{result.model_name} {result.model_version}")
    segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + "device", result.device)
    segmentationNode.SetAttribute(ATTRIBUTE_PREFIX + "warnings", "\n".join(result.warnings))


def _detachSegments(segmentationNode: Any) -> list[tuple[str, Any]]:
    """Remove and return (id, segment) of every segment, to restore them if applying fails."""
    segmentation = segmentationNode.GetSegmentation()
    kept = [(segmentId_, segmentation.GetSegment(segmentId_)) for segmentId_ in segmentation.GetSegmentIDs()]
    segmentation.RemoveAllSegments()
    return kept


def _restoreSegments(segmentationNode: Any, segments: list[tuple[str, Any]]) -> None:
    segmentation = segmentationNode.GetSegmentation()
    segmentation.RemoveAllSegments()
    for segmentId_, segment in segments:
        segmentation.AddSegment(segment, segmentId_)


def _placeNextTo(scene: Any, inputVolume: Any, nodes: Sequence[Any]) -> None:
    """Put ``nodes`` under the input volume's parent in the subject hierarchy, when there is one.

    A scene without a subject hierarchy node (plain slicer-core) is left without one.
    """
    shNode = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")
    if shNode is None:
        return
    volumeItem = shNode.GetItemByDataNode(inputVolume)
    if not volumeItem:
        return
    parentItem = shNode.GetItemParent(volumeItem)
    for node in nodes:
        item = shNode.GetItemByDataNode(node)
        if item:
            shNode.SetItemParent(item, parentItem)
        else:
            shNode.CreateItem(parentItem, node)


def _nodeLabel(node: Any) -> str:
    if node is None:
        return "input volume"
    return f"volume '{node.GetName()}'"
