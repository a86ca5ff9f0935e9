"""3D Slicer module: lungs and COVID-19 infection in chest CT (research use only, not for clinical use).

The work is in CovidInfectionSegLib: the engine, the MRML logic (slicer_logic.py) and the dependency
decisions (dependencies.py). This file holds what needs the Slicer application: the module
description, the panel and its parameter node, and the self-test. Nothing is installed and torch is
not imported when Slicer loads this file; the MRML logic (which imports torch) is imported on first use.
"""

import enum
import logging

import qt
import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from CovidInfectionSegLib import dependencies

DEVICE_SETTINGS_KEY = "CovidInfectionSeg/Device"
POLL_INTERVAL_MS = 200


class CovidInfectionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "COVID-19 Lung Infection Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["CovidInfectionSeg developers"]
        self.parent.helpText = (
            "Segments the right lung, the left lung and COVID-19 infection (ground-glass opacities and "
            "consolidation) in a chest CT, and measures lung and infection volumes, the percentage of lung "
            "infected and a severity grade (0 none to 5 critical).<br><br>"
            "<b>Usage:</b> choose the chest CT, keep <i>Create new segmentation</i> or pick one to overwrite, "
            "choose the device and click <i>Segment</i> (click again to cancel). The results table lists the "
            "volumes; <i>Show 3D</i> builds surfaces. The same logic runs from the Python console and in "
            "batch mode (see docs/slicer.md).<br><br>"
            "<b>Research use only, not for clinical use.</b> The model is a 2D U-Net trained on a small public "
            "data set; its output has not been validated for diagnosis or treatment decisions."
        )
        self.parent.acknowledgementText = (
            "The bundled model was trained on the COVID-19 CT Lung and Infection Segmentation Dataset: "
            "Ma J. et al., <i>Toward data-efficient learning: A benchmark for COVID-19 CT lung and infection "
            "segmentation</i>, Medical Physics 48(3), 2021, doi:10.1002/mp.14676. "
            "The model inherits the data set's licence, CC BY-NC-SA 4.0 (non-commercial)."
        )


class Device(enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:  # shown in the combo box by the parameter node connector
        return {"auto": "Auto (GPU if available)", "cuda": "CUDA (GPU)", "cpu": "CPU"}[self.value]


@parameterNodeWrapper
class CovidInfectionSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    device: Device = Device.AUTO


class CovidInfectionSegLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node, and the MRML segmentation logic (imported on first use: it imports torch)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmentationLogic = None

    def getParameterNode(self) -> CovidInfectionSegParameterNode:
        return CovidInfectionSegParameterNode(super().getParameterNode())

    def segmentationLogic(self):
        """:class:`CovidInfectionSegLib.slicer_logic.SegmentationLogic` (bundled model, loaded on first use)."""
        if self._segmentationLogic is None:
            from CovidInfectionSegLib.slicer_logic import SegmentationLogic

            self._segmentationLogic = SegmentationLogic()
        return self._segmentationLogic


class CovidInfectionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobNodes = None  # (input volume, output segmentation) of the running job
        self._lastSegmentation = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CovidInfectionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CovidInfectionSegLogic()
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self._timer.timeout.connect(self._pollJob)

        self.initializeParameterNode()
        self.updateDependencyStatus()
        qt.QTimer.singleShot(0, self.updateDeviceInfo)  # imports torch: after the panel has shown

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ---- parameter node

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        remembered = qt.QSettings().value(DEVICE_SETTINGS_KEY)
        if remembered in {device.value for device in Device}:
            parameterNode.device = Device(remembered)
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        qt.QSettings().setValue(DEVICE_SETTINGS_KEY, self._parameterNode.device.value)
        if self._job is None:
            self.ui.segmentButton.enabled = self._parameterNode.inputVolume is not None
        segmentation = self._parameterNode.outputSegmentation or self._lastSegmentation
        self.ui.show3DButton.enabled = segmentation is not None and segmentation.GetScene() is not None

    # ---- segmentation in a background thread

    def onSegmentButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self.ui.statusLabel.text = "Cancelling after the current batch of slices..."
            self.ui.segmentButton.enabled = False
            return
        if not self._dependenciesReady():
            return
        inputVolume = self._parameterNode.inputVolume
        with slicer.util.tryWithErrorDisplay("Cannot start the segmentation.", waitCursor=True):
            self._job = self.logic.segmentationLogic().startJob(inputVolume, device=self._parameterNode.device.value)
            self._jobNodes = (inputVolume, self._parameterNode.outputSegmentation)
            self.ui.segmentButton.text = "Cancel"
            self.ui.progressBar.setRange(0, 0)  # busy until the first batch reports the slice count
            self.ui.progressBar.show()
            self.ui.statusLabel.text = "Loading the model..."
            self._timer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job.slicesTotal:
            self.ui.progressBar.setRange(0, job.slicesTotal)
            self.ui.progressBar.value = job.slicesDone
            if not job.cancelRequested:
                self.ui.statusLabel.text = f"Segmenting... {job.elapsedSeconds:.0f} s"
        if job.finished:
            self._timer.stop()
            self._job = None
            self._finishJob(job)

    def _finishJob(self, job) -> None:
        inputVolume, outputSegmentation = self._jobNodes
        self._jobNodes = None
        self.ui.segmentButton.text = "Segment"
        self.ui.progressBar.hide()
        self.onParameterNodeModified()
        if job.cancelled:
            self.ui.statusLabel.text = f"Cancelled after {job.elapsedSeconds:.0f} s; nothing was added to the scene."
            return
        if job.error is not None:
            self.ui.statusLabel.text = f"Failed after {job.elapsedSeconds:.0f} s: {job.error}"
            logging.error("CovidInfectionSeg failed", exc_info=job.error)
            slicer.util.errorDisplay(f"Segmentation failed:\n\n{job.error}")
            return
        if inputVolume.GetScene() is None or (outputSegmentation is not None and outputSegmentation.GetScene() is None):
            self.ui.statusLabel.text = "The input or output node was removed while segmenting; nothing was added."
            return
        with slicer.util.tryWithErrorDisplay("Could not add the segmentation to the scene.", waitCursor=True):
            applied = self.logic.segmentationLogic().apply(job.result, inputVolume, outputSegmentation)
            self._showResult(applied, job.elapsedSeconds)

    def _showResult(self, applied, seconds: float) -> None:
        self._lastSegmentation = applied.segmentationNode
        if self._parameterNode is not None:
            self._parameterNode.outputSegmentation = applied.segmentationNode
        self.ui.resultsTableView.setMRMLTableNode(applied.tableNode)
        self.ui.resultsTableView.resizeColumnsToContents()
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.warningsLabel.text = "\n".join(f"Warning: {text}" for text in applied.warnings)
        total = applied.measurements.total
        self.ui.statusLabel.text = (
            f"Done in {seconds:.1f} s on {applied.result.device}: {total.lung_ml:.0f} mL lung, "
            f"{total.percent_infected:.1f}% infected, severity grade {total.grade} ({total.grade_name})."
        )
        slicer.util.setSliceViewerLayers(background=applied.segmentationNode.GetNodeReference(
            applied.segmentationNode.GetReferenceImageGeometryReferenceRole()), fit=True)
        self.onParameterNodeModified()

    def onShow3DButton(self) -> None:
        segmentation = self._parameterNode.outputSegmentation or self._lastSegmentation
        with slicer.util.tryWithErrorDisplay("Could not build the 3D surfaces.", waitCursor=True):
            self.logic.segmentationLogic().showIn3D(segmentation)
            threeDWidget = slicer.app.layoutManager().threeDWidget(0)
            if threeDWidget is not None:
                threeDWidget.threeDView().resetFocalPoint()

    # ---- devices and Python packages

    def updateDeviceInfo(self) -> None:
        if not dependencies.module_available("torch"):
            self.ui.deviceInfoLabel.text = "PyTorch is not installed yet (see Python packages below)."
            return
        try:
            import torch

            if torch.cuda.is_available():
                name = torch.cuda.get_device_name(0)
                self.ui.deviceInfoLabel.text = f"Detected: {name} (CUDA {torch.version.cuda}); Auto uses it."
            else:
                reason = "this PyTorch build is CPU-only" if torch.version.cuda is None else "no CUDA GPU visible"
                self.ui.deviceInfoLabel.text = f"Detected: CPU only ({reason}); Auto uses the CPU."
        except Exception as error:  # a broken torch install must not break the panel
            self.ui.deviceInfoLabel.text = f"PyTorch cannot be loaded: {error}"

    def updateDependencyStatus(self) -> bool:
        """Show what is missing; returns True when everything needed is installed."""
        try:
            torchStatus, statuses = dependencies.check()
        except (OSError, ValueError) as error:
            self.ui.dependencyStatusLabel.text = f"Cannot read the requirements: {error}"
            return False
        lines = [status.describe() for status in [torchStatus, *statuses]]
        ready = torchStatus.satisfied and all(status.satisfied for status in statuses)
        self.ui.dependencyStatusLabel.text = "\n".join(lines)
        self.ui.installDependenciesButton.enabled = not ready
        if not ready:
            self.ui.dependenciesCollapsibleButton.collapsed = False
        return ready

    def _dependenciesReady(self) -> bool:
        if self.updateDependencyStatus():
            return True
        self.ui.statusLabel.text = "Some Python packages are missing: install them under 'Python packages'."
        return False

    def onInstallDependencies(self) -> None:
        torchStatus, statuses = dependencies.check()
        plan = dependencies.plan_installation(torchStatus, statuses, pytorch_utils_available=_pytorchUtilsAvailable())
        if plan.nothing_to_do:
            self.updateDependencyStatus()
            return
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), "Install Python packages"):
            return

        def log(text: str) -> None:
            self.ui.dependencyStatusLabel.text = text
            slicer.app.processEvents()

        with slicer.util.tryWithErrorDisplay("Installing Python packages failed.", waitCursor=True):
            dependencies.install(plan, slicer.util.pip_install, _installTorchWithPyTorchUtils, log)
            if plan.restart_needed and slicer.util.confirmYesNoDisplay(
                "Slicer must restart to use the new packages. Restart now?"
            ):
                slicer.util.restart()
        self.updateDependencyStatus()
        self.updateDeviceInfo()


def _pytorchUtilsAvailable() -> bool:
    return hasattr(slicer.modules, "pytorchutils")


def _installTorchWithPyTorchUtils(versionSpecifier: str):
    import PyTorchUtils

    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=versionSpecifier)


class CovidInfectionSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): real sample CT, bundled model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_CTChestLungVolumes()
        self.setUp()
        self.test_PanelSegmentsInBackground()

    def test_CTChestLungVolumes(self):
        import SampleData

        from CovidInfectionSegLib.slicer_logic import SegmentationLogic

        self.delayDisplay("Loading the CTChest sample")
        volume = SampleData.downloadSample("CTChest")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        applied = SegmentationLogic().process(volume)
        segmentation = applied.segmentationNode.GetSegmentation()
        names = [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentation.GetSegmentIDs()]
        self.assertEqual(names, ["Right lung", "Left lung", "Infection"])
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        measurements = applied.measurements
        # An adult chest CT: litres of lung, both sides present, right lung usually the larger.
        self.assertTrue(2000 < measurements.total.lung_ml < 9000, measurements)
        for side in (measurements.right_lung, measurements.left_lung):
            self.assertTrue(0.3 < side.lung_ml / measurements.total.lung_ml < 0.7, measurements)
        self.assertTrue(0 <= measurements.total.percent_infected <= 100)
        self.delayDisplay(f"Lungs {measurements.total.lung_ml:.0f} mL, infected {measurements.total.percent_infected:.1f}%")

    def test_PanelSegmentsInBackground(self):
        import time

        import SampleData

        volume = SampleData.downloadSample("CTChest")
        widget = slicer.modules.covidinfectionseg.widgetRepresentation().self()
        widget.logic.getParameterNode().inputVolume = volume
        widget.logic.getParameterNode().outputSegmentation = None
        widget.ui.segmentButton.click()
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        deadline = time.monotonic() + 600
        while widget._job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()  # the GUI stays live while the worker thread segments
            time.sleep(0.05)
        self.assertIsNone(widget._job, "segmentation did not finish within 10 minutes")
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertIsNotNone(widget.ui.resultsTableView.mrmlTableNode())
        self.assertEqual(widget.ui.resultsTableView.mrmlTableNode().GetNumberOfRows(), 3)
