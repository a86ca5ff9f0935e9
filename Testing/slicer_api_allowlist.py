"""The 3D Slicer API the module may use, and where each name is defined in Slicer's source.

Every name :func:`slicer_api.used_api` finds in the module's code must be a key here. A value lists
where the name is defined: ``(path in the Slicer/Slicer repository, symbol)`` pairs (an empty symbol:
the file must exist), or the name of the project that defines it when that is not Slicer (VTK, Qt,
CTK, SimpleITK, Python's unittest). ``test_slicer_api.py`` checks every Slicer pair at each supported
version (:data:`SUPPORTED`) when a Slicer git repository is at hand (``SLICER_GIT_DIR``); the names
from VTK, Qt and CTK are their long-stable basics (VTK 9.2 to 9.6 and Qt 5.15 in these versions).
"""

from __future__ import annotations

# Slicer version -> git ref checked. main as fetched for this project (2026-08-21).
SUPPORTED = {
    "5.6.1": "v5.6.1",
    "5.6.2": "v5.6.2",
    "5.8.1": "v5.8.1",
    "5.10.0": "v5.10.0",
    "main": "583e9b37d50ead7daf7b783dce465ccaecec8809",
}

VTK, QT, CTK, SITK, UNITTEST = "VTK", "Qt", "CTK", "SimpleITK", "unittest"
PY = "Base/Python/slicer/"
SLM = PY + "ScriptedLoadableModule.py"
UTIL = PY + "util.py"
MRML = "Libs/MRML/Core/"
WIDGETS = "Libs/MRML/Widgets/"
SEG = "Libs/vtkSegmentationCore/"
NODE = MRML + "vtkMRMLNode.h"
SCENE = MRML + "vtkMRMLScene.h"
TABLE = MRML + "vtkMRMLTableNode.h"
SEGMENTATION_NODE = MRML + "vtkMRMLSegmentationNode.h"
SH = MRML + "vtkMRMLSubjectHierarchyNode.h"
VOLUME = MRML + "vtkMRMLVolumeNode.h"
STORAGE = MRML + "vtkMRMLStorageNode.h"


def _util(*names: str) -> dict[str, list]:
    return {f"slicer.util.{name}": [(UTIL, name)] for name in names}


def _scene(*names: str) -> dict[str, list]:
    return {f"slicer.mrmlScene.{name}": [(PY + "__init__.py", "mrmlScene"), (SCENE, name)] for name in names}


def _methods(path: str, *names: str) -> dict[str, list]:
    return {f"*.{name}": [(path, name)] for name in names}


def _from(origin: str, *names: str) -> dict[str, list]:
    return {name: [origin] for name in names}


ALLOWED: dict[str, list] = {
    # modules and module-level objects
    "slicer": [(PY + "__init__.py", "")],
    "qt": [QT],
    "vtk": [VTK],
    "slicer.mrmlScene": [(PY + "__init__.py", "mrmlScene")],
    "slicer.modules": [(PY + "__init__.py", "modules")],
    "slicer.app": [(PY + "__init__.py", "app")],
    "slicer.app.processEvents": [QT],
    "slicer.app.layoutManager().threeDWidget": [("Base/QTGUI/qSlicerApplication.h", "layoutManager"),
                                                (WIDGETS + "qMRMLLayoutManager.h", "threeDWidget")],
    "slicer.app.layoutManager().threeDWidget().threeDView().resetFocalPoint": [
        (WIDGETS + "qMRMLThreeDWidget.h", "threeDView"), (WIDGETS + "qMRMLThreeDView.h", "resetFocalPoint")],
    "slicer.modules.covidinfectionseg.widgetRepresentation().self": [
        ("Base/QTCore/qSlicerAbstractCoreModule.h", "widgetRepresentation"),
        ("Base/QTGUI/qSlicerScriptedLoadableModuleWidget.h", "self")],
    "slicer.i18n.tr": [(PY + "i18n.py", "tr")],
    "slicer.i18n.translate": [(PY + "i18n.py", "translate")],
    "slicer.parameterNodeWrapper.parameterNodeWrapper": [(PY + "parameterNodeWrapper/wrapper.py", "parameterNodeWrapper"),
                                                         (PY + "parameterNodeWrapper/__init__.py", "")],
    # scripted module base classes, and what the module's classes take from them
    "slicer.ScriptedLoadableModule.ScriptedLoadableModule": [(SLM, "ScriptedLoadableModule")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModule.__init__": [(SLM, "__init__")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleLogic": [(SLM, "ScriptedLoadableModuleLogic")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleTest": [(SLM, "ScriptedLoadableModuleTest")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget": [(SLM, "ScriptedLoadableModuleWidget")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.__init__": [(SLM, "__init__")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.onReload": [(SLM, "onReload")],
    "slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.setup": [(SLM, "setup")],
    "CovidInfectionSeg.self.parent": [(SLM, "parent")],
    "CovidInfectionSegWidget.self.parent": [(SLM, "parent")],
    "CovidInfectionSegWidget.self.layout": [(SLM, "layout")],
    "CovidInfectionSegWidget.self.resourcePath": [(SLM, "resourcePath")],
    "CovidInfectionSegWidget.self.addObserver": [(UTIL, "addObserver")],
    "CovidInfectionSegWidget.self.removeObserver": [(UTIL, "removeObserver")],
    "CovidInfectionSegWidget.self.removeObservers": [(UTIL, "removeObservers")],
    "CovidInfectionSegTest.self.delayDisplay": [(SLM, "delayDisplay")],
    **_from(UNITTEST, *(f"CovidInfectionSegTest.self.{name}" for name in (
        "assertEqual", "assertGreater", "assertIn", "assertIsNone", "assertIsNotNone", "assertTrue", "skipTest"))),
    "slicer.util.VTKObservationMixin.__init__": [(UTIL, "VTKObservationMixin"), (UTIL, "__init__")],
    # slicer.util
    **_util("VTKObservationMixin", "arrayFromVTKMatrix", "arrayFromVolume", "childWidgetVariables", "confirmOkCancelDisplay",
            "confirmYesNoDisplay", "errorDisplay", "exit", "loadUI", "restart", "setSliceViewerLayers",
            "tryWithErrorDisplay", "updateVTKMatrixFromArray"),
    "slicer.util.loadUI().setMRMLScene": [(WIDGETS + "qMRMLWidget.h", "setMRMLScene")],
    # the scene
    **_scene("Clear", "EndCloseEvent", "GetFirstNodeByClass", "GetNumberOfNodes", "StartCloseEvent"),
    # MRML and segmentation classes
    "slicer.vtkMRMLScene": [(SCENE, "")],
    "slicer.vtkMRMLScalarVolumeNode": [(MRML + "vtkMRMLScalarVolumeNode.h", "")],
    "slicer.vtkMRMLSegmentationNode": [(SEGMENTATION_NODE, "")],
    "slicer.vtkOrientedImageData": [(SEG + "vtkOrientedImageData.h", "")],
    "slicer.vtkSegment": [(SEG + "vtkSegment.h", "")],
    "slicer.vtkSegment.GetTerminologyEntryTagName": [(SEG + "vtkSegment.h", "GetTerminologyEntryTagName")],
    # methods of MRML nodes, the scene and segmentations
    **_methods(SCENE, "AddNewNodeByClass", "GenerateUniqueName", "GetFirstNodeByClass", "RemoveNode"),
    **_methods(NODE, "EndModify", "GetAttribute", "GetID", "GetNodeReference", "GetScene", "SetAttribute", "SetNodeReferenceID",
               "StartModify"),
    "*.GetName": [(NODE, "GetName"), (SEG + "vtkSegment.h", "GetName")],
    "*.SetName": [(NODE, "SetName"), (SEG + "vtkSegment.h", "SetName"), VTK],
    "*.GetDisplayNode": [(MRML + "vtkMRMLDisplayableNode.h", "GetDisplayNode")],
    "*.CreateDefaultDisplayNodes": [(MRML + "vtkMRMLDisplayableNode.h", "CreateDefaultDisplayNodes"),
                                    (SEGMENTATION_NODE, "CreateDefaultDisplayNodes")],
    "*.CreateDefaultStorageNode": [(SEGMENTATION_NODE, "CreateDefaultStorageNode")],
    "*.SetVisibility3D": [(MRML + "vtkMRMLDisplayNode.h", "SetVisibility3D")],
    **_methods(MRML + "vtkMRMLTransformableNode.h", "GetTransformNodeID", "SetAndObserveTransformNodeID"),
    **_methods(VOLUME, "GetIJKToRASMatrix", "SetIJKToRASMatrix", "GetImageData", "SetAndObserveImageData"),
    **_methods(STORAGE, "SetFileName", "WriteData"),
    **_methods(TABLE, "AddColumn", "GetNumberOfRows", "GetTable", "RemoveAllColumns", "SetColumnDescription",
               "SetColumnTitle", "SetColumnUnitLabel", "SetLocked", "SetUseColumnTitleAsColumnHeader"),
    **_methods(SH, "CreateItem", "GetItemByDataNode", "GetItemParent", "SetItemParent"),
    **_methods(SEGMENTATION_NODE, "CreateClosedSurfaceRepresentation", "GetSegmentation",
               "SetReferenceImageGeometryParameterFromVolumeNode"),
    **_methods(SEG + "vtkSegmentation.h", "AddSegment", "GetSegment", "GetSegmentIDs", "RemoveAllSegments",
               "SetSourceRepresentationName"),
    **_methods(SEG + "vtkSegment.h", "AddRepresentation", "GetTag", "SetColor", "SetColorAutoGenerated", "SetLabelValue",
               "SetNameAutoGenerated", "SetTag"),
    "*.SetImageToWorldMatrix": [(SEG + "vtkOrientedImageData.h", "SetImageToWorldMatrix")],
    # VTK itself
    **_from(VTK, "vtk.VTK_UNSIGNED_CHAR", "vtk.reference", "vtk.util.numpy_support", "vtk.util.numpy_support.get_vtk_array_type",
            "vtk.util.numpy_support.vtk_to_numpy", "vtk.vtkCommand.ModifiedEvent", "vtk.vtkDoubleArray", "vtk.vtkImageData",
            "vtk.vtkIntArray", "vtk.vtkMatrix4x4", "vtk.vtkStringArray"),
    **_from(VTK, *(f"*.{name}" for name in (
        "AllocateScalars", "GetClassName", "GetColumn", "GetDimensions", "GetNumberOfColumns", "GetNumberOfPoints",
        "GetNumberOfScalarComponents", "GetScalars", "GetValue", "InsertNextValue", "IsA", "SetDimensions", "ToDouble",
        "ToString", "UnRegister"))),
    # SimpleITK images (the same CamelCase style)
    **_from(SITK, *(f"*.{name}" for name in (
        "GetDimension", "GetDirection", "GetNumberOfComponentsPerPixel", "GetOrigin", "GetSize", "GetSpacing",
        "SetDirection", "SetOrigin", "SetSpacing"))),
    # Qt: settings and the timer
    **_from(QT, "qt.QSettings().setValue", "qt.QSettings().value", "qt.QTimer"),
    # the panel's widgets (CovidInfectionSeg.ui): Qt and CTK widgets, and one qMRML widget
    "ui.resultsTableView.setMRMLTableNode": [(WIDGETS + "qMRMLTableView.h", "setMRMLTableNode")],
    "ui.resultsTableView.mrmlTableNode": [(WIDGETS + "qMRMLTableView.h", "mrmlTableNode")],
    "ui.resultsTableView.resizeColumnsToContents": [QT],
    **_from(CTK, "ui.dependenciesCollapsibleButton.collapsed", "ui.resultsCollapsibleButton.collapsed"),
    **_from(QT, "ui.dependencyStatusLabel.text", "ui.deviceInfoLabel.text", "ui.statusLabel.text", "ui.warningsLabel.text",
            "ui.installDependenciesButton.connect", "ui.installDependenciesButton.enabled",
            "ui.installDependenciesButton.text", "ui.segmentButton.connect",
            "ui.segmentButton.enabled", "ui.segmentButton.text", "ui.segmentButton.click", "ui.show3DButton.connect",
            "ui.show3DButton.enabled", "ui.progressBar.hide", "ui.progressBar.setRange", "ui.progressBar.show",
            "ui.progressBar.value", "ui.flipTTACheckBox.checked",
            "ui.noduleCheckBox.checked"),
}


def slicer_checks() -> list[tuple[str, str]]:
    """Every (path, symbol) pair to check in Slicer's source."""
    return sorted({check for checks in ALLOWED.values() for check in checks if isinstance(check, tuple)})
