"""The module's MRML side on a real MRML scene (slicer-core), with a real TorchScript model.

Volume nodes to images and back, and an engine result into the scene (CovidInfectionSegSlicer.volumes
and .results). The result comes from the engine in this process here, so these tests stay fast; the
child process that the module really uses is tested in test_slicer_engine_process.py.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

from model_factory import write_model_package  # noqa: E402
from phantoms import chest_phantom, lung_and_infection_net  # noqa: E402

from CovidInfectionSegLib.model_package import load_model_package  # noqa: E402
from CovidInfectionSegLib.pipeline import segment_image  # noqa: E402
from CovidInfectionSegLib.segments import terminology_entry  # noqa: E402
from CovidInfectionSegLib.validation import InputError  # noqa: E402
from CovidInfectionSegSlicer import results  # noqa: E402
from CovidInfectionSegSlicer.logic import EngineError, SegmentationLogic  # noqa: E402
from CovidInfectionSegSlicer.results import MEASUREMENTS_REFERENCE_ROLE, applyResult, measurementsFromTable, showIn3D  # noqa: E402
from CovidInfectionSegSlicer.volumes import imageToVolumeNode, volumeNodeToImage  # noqa: E402

SPACING = (1.5, 1.5, 5.0)  # the engine's coarsest without a warning
ORIGIN = (-41.0, 17.5, 203.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
RAS_ORDERED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # LPS-flipped in-plane, as many NIfTI files
Z_FLIPPED = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SEGMENT_NAMES = ["Right lung", "Left lung", "Infection"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A real TorchScript package whose output has lung and infection on the phantom."""
    return load_model_package(write_model_package(tmp_path_factory.mktemp("model"), lung_and_infection_net(), "lunginf"))


@pytest.fixture(scope="module")
def phantom():
    # Lungs of 260 mL each, above the post-processing's 20 mL minimum, and 16.7 mL of (bright) infection: over the
    # nodule check's 14.1 mL, so it stays infection rather than becoming lung as a small solid nodule.
    return chest_phantom(shape=(20, 112, 112), spacing=SPACING, infection_in_right=True)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def segment_into_scene(model, volume, outputSegmentation=None):
    """The engine on the volume's voxels, then the result into the scene: what the module does,
    minus the child process."""
    result = segment_image(volumeNodeToImage(volume), model, name=f"volume '{volume.GetName()}'")
    return applyResult(result, volume, outputSegmentation)


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def labelmap_of(segmentation_node, segment_id: str):
    """(voxels (k, j, i), image-to-world 4x4, the vtkOrientedImageData) of a segment's binary labelmap."""
    labelmap = segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    dims = labelmap.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(dims[::-1])
    return voxels, slicer.util.arrayFromVTKMatrix(matrix), labelmap


def ras_centroid(mask: np.ndarray, ijk_to_ras_matrix: np.ndarray) -> np.ndarray:
    k, j, i = np.nonzero(mask)
    ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
    return (ijk_to_ras_matrix @ ijk)[:3].mean(axis=1)


@pytest.mark.parametrize("direction", [IDENTITY, RAS_ORDERED, Z_FLIPPED], ids=["identity", "ras-ordered", "z-flipped"])
def test_volume_becomes_segmentation_with_input_geometry(scene, model, phantom, direction):
    image = phantom.image(direction=direction, origin=ORIGIN)
    volume = imageToVolumeNode(image, scene, "chest")
    expected = segment_image(image, model)  # the engine on the same image, without MRML

    applied = segment_into_scene(model, volume)

    node = applied.segmentationNode
    segmentation = node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()] == SEGMENT_NAMES
    assert segmentation.GetNumberOfLayers() == 1  # one shared labelmap, label value per segment
    for info in model.segments:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(info.name))
        assert segment.GetLabelValue() == info.value
        assert segment.GetColor() == pytest.approx([c / 255 for c in info.color])
        entry = vtk.reference("")
        assert segment.GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        assert str(entry) == terminology_entry(info.terminology)

    voxels, image_to_world, _ = labelmap_of(node, "Right_lung")
    assert np.array_equal(image_to_world, ijk_to_ras(volume))
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(expected.labelmap))
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    # What the post-processing changed (here: specks dropped) goes on the node, as the warnings do.
    assert expected.notes and applied.notes == expected.notes
    assert node.GetAttribute("CovidInfectionSeg.postprocessingNotes") == "\n".join(expected.notes)

    # Independent of the engine: the phantom's lung volumes, and sides in patient space (RAS x grows
    # toward the patient's right), whatever the voxel order of the input.
    assert applied.measurements.right_lung.lung_ml == pytest.approx(phantom.right_lung.sum() * phantom.voxel_ml)
    assert applied.measurements.total.infection_ml == pytest.approx(phantom.infection.sum() * phantom.voxel_ml)
    right = ras_centroid(voxels == 1, ijk_to_ras(volume))
    left = ras_centroid(voxels == 2, ijk_to_ras(volume))
    assert right[0] > left[0]

    table = measurementsFromTable(applied.tableNode)
    for region, title in (("right_lung", "Right lung"), ("left_lung", "Left lung"), ("total", "Both lungs")):
        row = expected.measurements.region(region).to_dict()
        assert table[title]["grade_name"] == row["grade_name"]
        for column in ("lung_ml", "infection_ml", "percent_infected", "grade"):
            assert table[title][column] == pytest.approx(row[column])
    assert node.GetNodeReference(MEASUREMENTS_REFERENCE_ROLE) is applied.tableNode


def test_volume_node_round_trip_keeps_voxels_and_geometry(scene, phantom):
    image = phantom.image(direction=RAS_ORDERED, origin=ORIGIN)
    back = volumeNodeToImage(imageToVolumeNode(image, scene, "ct"))
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == pytest.approx(image.GetSpacing())
    assert back.GetOrigin() == pytest.approx(image.GetOrigin())
    assert back.GetDirection() == pytest.approx(image.GetDirection())
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))


def test_rerun_into_the_same_segmentation_replaces_segments_and_updates_its_table(scene, model, phantom):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    first = segment_into_scene(model, volume)
    nodes_after_first = scene.GetNumberOfNodes()

    second = segment_into_scene(model, volume, outputSegmentation=first.segmentationNode)

    assert scene.GetNumberOfNodes() == nodes_after_first
    assert second.segmentationNode is first.segmentationNode
    assert second.tableNode is first.tableNode
    assert second.segmentationNode.GetSegmentation().GetNumberOfSegments() == 3


def test_results_are_placed_next_to_the_input_in_the_subject_hierarchy(scene, model, phantom):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    sh = scene.GetSubjectHierarchyNode()  # creates it, as the Slicer application always has one
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "Study")
    sh.CreateItem(study, volume)

    applied = segment_into_scene(model, volume)

    for node in (applied.segmentationNode, applied.tableNode):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


def test_output_follows_the_input_transform(scene, model, phantom):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    applied = segment_into_scene(model, volume)
    assert applied.segmentationNode.GetTransformNodeID() == transform.GetID()


def test_show_in_3d_builds_closed_surfaces(scene, model, phantom):
    # The Slicer application registers this rule at startup; plain slicer-core does not.
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    applied = segment_into_scene(model, imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest"))
    showIn3D(applied.segmentationNode)
    surface = applied.segmentationNode.GetSegmentation().GetSegment("Left_lung").GetRepresentation("Closed surface")
    assert surface is not None and surface.GetNumberOfPoints() > 0


# ------------------------------------------------------------------------------------------ failures


def two_d_volume(scene):
    image = sitk.GetImageFromArray(np.full((1, 64, 64), -1000, dtype=np.int16))
    return imageToVolumeNode(image, scene, "scout")


def test_2d_volume_is_refused_before_any_child_starts(scene, tmp_path):
    volume = two_d_volume(scene)
    count = scene.GetNumberOfNodes()
    never_run = tmp_path / "no-interpreter-needed"  # the volume is refused before the child would start
    with pytest.raises(InputError, match=r"volume 'scout': a 2D image \(size 64 x 64 x 1\)"):
        SegmentationLogic(str(never_run)).start(volume)
    assert scene.GetNumberOfNodes() == count


def test_bad_model_is_refused_and_scene_unchanged(scene, phantom, tmp_path):
    manifest_path = write_model_package(tmp_path / "model")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    count = scene.GetNumberOfNodes()
    with pytest.raises(EngineError, match="^model: .*checksum mismatch") as raised:
        SegmentationLogic(sys.executable, model=manifest_path).process(volume, timeout=300)
    assert raised.value.kind == "model" and raised.value.exitCode == 3
    assert scene.GetNumberOfNodes() == count


def test_failure_while_applying_removes_what_was_added(scene, model, phantom, monkeypatch):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    existing = segment_into_scene(model, volume).segmentationNode
    count = scene.GetNumberOfNodes()

    def broken_table(*_args, **_kwargs):
        raise RuntimeError("disk full while filling the table")

    monkeypatch.setattr(results, "fillMeasurementTable", broken_table)
    with pytest.raises(RuntimeError, match="disk full"):
        segment_into_scene(model, volume)  # new segmentation + display + table created, then removed
    assert scene.GetNumberOfNodes() == count

    existing.GetSegmentation().RemoveAllSegments()
    existing.GetSegmentation().AddEmptySegment("mine", "My own segment")
    with pytest.raises(RuntimeError, match="disk full"):
        segment_into_scene(model, volume, outputSegmentation=existing)
    assert existing.GetSegmentation().GetSegmentIDs() == ("mine",)
    assert scene.GetNumberOfNodes() == count


def test_sheared_and_label_volumes_are_refused(scene, phantom):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    sheared = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(sheared)
    sheared.SetElement(0, 1, 0.3)
    volume.SetIJKToRASMatrix(sheared)
    with pytest.raises(InputError, match="sheared"):
        volumeNodeToImage(volume)
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    with pytest.raises(InputError, match="vtkMRMLLabelMapVolumeNode"):
        volumeNodeToImage(labels)
