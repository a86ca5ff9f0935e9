"""3D Slicer module: lungs and COVID-19 infection in chest CT (research use only, not for clinical use).

This file holds what needs the Slicer application: the module description, the panel and its
parameter node, and the self-test. The logic is in ``CovidInfectionSegSlicer`` (MRML, the child
process, the Python packages), the engine in ``CovidInfectionSegLib``. The engine runs in a child
process started with ``PythonSlicer``, so Slicer never imports torch: opening the panel costs no
seconds of CUDA initialisation, and the GUI stays live while the child works. A QTimer polls the
child; there are no Python threads here.
"""

from __future__ import annotations

import enum
import logging
import sys
from typing import TYPE_CHECKING, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:
    from CovidInfectionSegSlicer.dependencies import DependencyLogicProtocol
    from CovidInfectionSegSlicer.logic import SegmentationLogicProtocol

# Packages of this module that Reload must re-import (they are not reloaded with this file otherwise).
PACKAGES = ("CovidInfectionSegLib", "CovidInfectionSegSlicer")
DEVICE_SETTINGS_KEY = "CovidInfectionSeg/Device"
FLIP_TTA_SETTINGS_KEY = "CovidInfectionSeg/FlipTTA"
POLL_INTERVAL_MS = 200


class CovidInfectionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("COVID-19 Lung Infection Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["CovidInfectionSeg developers"]
        self.parent.helpText = _(
            "Segments the right lung, the left lung and COVID-19 infection (ground-glass opacities and "
            "consolidation) in a chest CT, and measures lung and infection volumes, the percentage of lung "
            "infected and a severity grade (0 none to 5 critical).<br><br>"
            "<b>Usage:</b> choose the chest CT, keep <i>Create new segmentation</i> or pick one to overwrite, "
            "choose the device and click <i>Segment</i> (click again to cancel). <i>Mirror averaging</i> runs each "
            "slice a second time mirrored left-right: twice the time; with model v1, less false infection on three of "
            "four healthy scans. <i>Small solid lesions are nodules</i> (on by default) makes small solid infection "
            "components lung, as nodules; turn it off to see everything the network called infection. "
            "The results table lists the "
            "volumes; <i>Show 3D</i> builds surfaces. The same logic runs from the Python console and in "
            "batch mode (see docs/slicer.md).<br><br>"
            "<b>Research use only, not for clinical use.</b> The model is a 2D U-Net trained on a small public "
            "data set; its output has not been validated for diagnosis or treatment decisions."
        )
        self.parent.acknowledgementText = _(
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
        return {"auto": _("Auto (GPU if available)"), "cuda": _("CUDA (GPU)"), "cpu": _("CPU")}[self.value]


@parameterNodeWrapper
class CovidInfectionSegParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    device: Device = Device.AUTO
    flipTTA: bool = False
    noduleCheck: bool = True


class CovidInfectionSegLogic(ScriptedLoadableModuleLogic):
    """The module's parameter node. The segmentation logic is ``CovidInfectionSegSlicer.logic.SegmentationLogic``."""

    def getParameterNode(self) -> CovidInfectionSegParameterNode:
        return CovidInfectionSegParameterNode(super().getParameterNode())


def stageText(stage: Optional[str]) -> str:
    """What the status line says while the child is in ``stage`` (CovidInfectionSegLib.worker.STAGES).
    Only the text needed is translated: _() inspects the call stack, and this runs on every timer tick."""
    if stage == "loading_model":
        return _("Loading the model...")
    if stage == "reading":
        return _("Reading the volume...")
    if stage == "inference":
        return _("Segmenting slices...")
    if stage == "postprocessing":
        return _("Post-processing: lungs, sides and infection...")
    if stage == "writing":
        return _("Handing over the result...")
    return _("Starting the engine...")


class CovidInfectionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None, segmentationLogic: Optional[SegmentationLogicProtocol] = None,
                 dependencyLogic: Optional[DependencyLogicProtocol] = None) -> None:
        # Everything setup() needs comes first: without a parent the base constructor calls setup() itself.
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.segmentationLogic = segmentationLogic
        self.dependencyLogic = dependencyLogic
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the SegmentationRun in progress
        self._runInput = None
        self._deviceQuery = None
        self._installation = None  # the pip installation in progress
        self._installationPlan = None
        self._lastSegmentation = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        ScriptedLoadableModuleWidget.__init__(self, parent)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from CovidInfectionSegSlicer.dependencies import DependencyLogic
        from CovidInfectionSegSlicer.logic import SegmentationLogic

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CovidInfectionSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CovidInfectionSegLogic()
        if self.segmentationLogic is None:
            self.segmentationLogic = SegmentationLogic()
        if self.dependencyLogic is None:
            self.dependencyLogic = DependencyLogic(pytorch_utils_available=hasattr(slicer.modules, "pytorchutils"))
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self._timer.connect("timeout()", self._poll)

        self.initializeParameterNode()
        if self.updateDependencyStatus():
            self.startDeviceQuery()
        else:
            self.ui.deviceInfoLabel.text = _("PyTorch and the other packages are needed first (see Python packages below).")

    def cleanup(self) -> None:
        self._cancelChildren()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onReload(self) -> None:
        """Reload also re-imports this module's packages (they are cached in sys.modules otherwise)."""
        self._cancelChildren()
        for name in [name for name in sys.modules if name.split(".")[0] in PACKAGES]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
            self._finishRun()
        self.setParameterNode(None)
        self._clearResult()

    def _clearResult(self) -> None:
        """Forget the shown result: after a scene close it belongs to a scan that is gone."""
        self._lastSegmentation = None
        self.ui.resultsTableView.setMRMLTableNode(None)
        self.ui.statusLabel.text = ""
        self.ui.warningsLabel.text = ""

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
        rememberedFlip = qt.QSettings().value(FLIP_TTA_SETTINGS_KEY)
        if rememberedFlip is not None:  # QSettings gives back "true"/"false" from its file, a bool before
            parameterNode.flipTTA = str(rememberedFlip).lower() == "true"
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # Not connectGui(self.ui): before Slicer 5.10 it returns no tag, so disconnectGui could not undo
            # it, and each re-entry's stale device connector reset the remembered device to Auto.
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui({
                "inputVolume": self.ui.inputVolumeSelector,
                "outputSegmentation": self.ui.outputSegmentationSelector,
                "device": self.ui.deviceComboBox,
                "flipTTA": self.ui.flipTTACheckBox,
                "noduleCheck": self.ui.noduleCheckBox,
            })
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        qt.QSettings().setValue(DEVICE_SETTINGS_KEY, self._parameterNode.device.value)
        qt.QSettings().setValue(FLIP_TTA_SETTINGS_KEY, self._parameterNode.flipTTA)
        if self._run is None:
            self.ui.segmentButton.enabled = self._parameterNode.inputVolume is not None
        segmentation = self._parameterNode.outputSegmentation or self._lastSegmentation
        self.ui.show3DButton.enabled = segmentation is not None and segmentation.GetScene() is not None

    # ---- segmentation in a child process, polled by the timer

    def onSegmentButton(self) -> None:
        if self._run is not None:
            seconds = self._run.cancel()
            logging.info(f"CovidInfectionSeg: cancelled; the engine process exited {seconds:.2f} s later")
            self._finishRun()
            return
        if self._installation is not None:
            self.ui.statusLabel.text = _("Python packages are being installed; segment when that has finished.")
            return
        if not self._dependenciesReady():
            return
        inputVolume = self._parameterNode.inputVolume
        with slicer.util.tryWithErrorDisplay(_("Cannot start the segmentation."), waitCursor=True):
            self._run = self.segmentationLogic.start(
                inputVolume, self._parameterNode.outputSegmentation, self._parameterNode.device.value,
                self._parameterNode.flipTTA, self._parameterNode.noduleCheck)
            self._runInput = inputVolume
            self.ui.segmentButton.text = _("Cancel")
            self.ui.progressBar.setRange(0, 0)  # busy until the child reports the slice count
            self.ui.progressBar.show()
            self.ui.statusLabel.text = stageText(None)
            self._timer.start()

    def _poll(self) -> None:
        if self._deviceQuery is not None and self._deviceQuery.poll():
            self._showDeviceInfo(self._deviceQuery)
            self._deviceQuery = None
        if self._run is not None:
            run = self._run
            finished = run.poll()  # on this (the main) thread: a finished result goes into the scene here
            if run.slicesTotal:
                self.ui.progressBar.setRange(0, run.slicesTotal)
                self.ui.progressBar.value = run.slicesDone
            self.ui.statusLabel.text = _("{stage} {seconds} s").format(stage=stageText(run.stage),
                                                                       seconds=f"{run.elapsedSeconds:.0f}")
            if finished:
                self._finishRun()
        if self._installation is not None:
            self._pollInstallation()
        if self._run is None and self._deviceQuery is None and self._installation is None:
            self._timer.stop()

    def _finishRun(self) -> None:
        from CovidInfectionSegSlicer.logic import CANCELLED, FAILED

        run, inputVolume = self._run, self._runInput
        self._run = self._runInput = None
        self.ui.segmentButton.text = _("Segment")
        self.ui.progressBar.hide()
        self.onParameterNodeModified()
        seconds = run.elapsedSeconds
        if run.state == CANCELLED:
            self.ui.statusLabel.text = _("Cancelled after {seconds} s; nothing was added to the scene.").format(
                seconds=f"{seconds:.0f}")
        elif run.state == FAILED:
            self.ui.statusLabel.text = _("Failed after {seconds} s: {error}").format(seconds=f"{seconds:.0f}", error=run.error)
            logging.error(f"CovidInfectionSeg failed: {run.error}")
            slicer.util.errorDisplay(_("Segmentation failed:\n\n{error}").format(error=run.error))
        else:
            self._showResult(run.applied, inputVolume, seconds)

    def _showResult(self, applied, inputVolume, seconds: float) -> None:
        self._lastSegmentation = applied.segmentationNode
        if self._parameterNode is not None:
            self._parameterNode.outputSegmentation = applied.segmentationNode
        self.ui.resultsTableView.setMRMLTableNode(applied.tableNode)
        self.ui.resultsTableView.resizeColumnsToContents()
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.warningsLabel.text = "\n".join(
            [_("Warning: {text}").format(text=text) for text in applied.warnings]
            + [_("Post-processing: {text}").format(text=text) for text in applied.notes]
        )
        total = applied.measurements.total
        device = applied.result.device
        if applied.result.flip_tta:
            device = _("{device} with mirror averaging").format(device=device)
        if not applied.result.nodule_check:
            device = _("{device}, small solid lesions kept as infection").format(device=device)
        self.ui.statusLabel.text = _(
            "Done in {seconds} s on {device}: {lung} mL lung, {percent}% infected, severity grade {grade} ({name})."
        ).format(seconds=f"{seconds:.1f}", device=device, lung=f"{total.lung_ml:.0f}",
                 percent=f"{total.percent_infected:.1f}", grade=total.grade, name=total.grade_name)
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=True)
        self.onParameterNodeModified()

    def onShow3DButton(self) -> None:
        segmentation = self._parameterNode.outputSegmentation or self._lastSegmentation
        with slicer.util.tryWithErrorDisplay(_("Could not build the 3D surfaces."), waitCursor=True):
            self.segmentationLogic.showIn3D(segmentation)
            threeDWidget = slicer.app.layoutManager().threeDWidget(0)
            if threeDWidget is not None:
                threeDWidget.threeDView().resetFocalPoint()

    def _cancelChildren(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self._run = self._runInput = None
        if self._deviceQuery is not None:
            self._deviceQuery.cancel()
            self._deviceQuery = None
        if self._installation is not None:
            # A pip that writes packages is waited for (seconds): killing it could break them, and
            # leaving it would let a reloaded panel start a second pip beside it.
            self._installation.cancel(wait=True)
            self._installation = None

    # ---- devices and Python packages

    def startDeviceQuery(self) -> None:
        """Ask the engine's Python (a child process: torch is never imported here) what it can use."""
        if self._deviceQuery is not None:
            return
        self.ui.deviceInfoLabel.text = _("Detecting devices...")
        try:
            self._deviceQuery = self.segmentationLogic.queryDevice()
        except (OSError, RuntimeError) as error:
            self.ui.deviceInfoLabel.text = _("Cannot start the engine: {error}").format(error=error)
            return
        self._timer.start()

    def _showDeviceInfo(self, query) -> None:
        info = query.info
        if info is None:
            self.ui.deviceInfoLabel.text = _("PyTorch cannot be loaded: {error}").format(error=query.error)
        elif info["cuda_available"]:
            self.ui.deviceInfoLabel.text = _("Detected: {gpus} (CUDA {cuda}); Auto uses it.").format(
                gpus=", ".join(info["gpus"]), cuda=info["cuda_build"])
        else:
            reason = _("this PyTorch build is CPU-only") if info["cuda_build"] is None else _("no CUDA GPU visible")
            self.ui.deviceInfoLabel.text = _("Detected: CPU only ({reason}); Auto uses the CPU.").format(reason=reason)

    def updateDependencyStatus(self) -> bool:
        """Show what is missing; returns True when everything needed is installed."""
        try:
            ready, lines = self.dependencyLogic.status()
        except (OSError, ValueError) as error:
            self.ui.dependencyStatusLabel.text = _("Cannot read the requirements: {error}").format(error=error)
            return False
        self.ui.dependencyStatusLabel.text = "\n".join(lines)
        self.ui.installDependenciesButton.enabled = not ready
        if not ready:
            self.ui.dependenciesCollapsibleButton.collapsed = False
        return ready

    def _dependenciesReady(self) -> bool:
        if self.updateDependencyStatus():
            return True
        self.ui.statusLabel.text = _("Some Python packages are missing: install them under 'Python packages'.")
        return False

    def onInstallDependencies(self) -> None:
        if self._installation is not None:  # the button reads "Cancel installation"
            if self._installation.cancel():
                self._finishInstallation()
            return  # pip is writing the packages: the status line says so, and it finishes on its own
        plan = self.dependencyLogic.plan()
        if plan.nothing_to_do:
            self.updateDependencyStatus()
            return
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), _("Install Python packages")):
            return

        def log(text: str) -> None:
            logging.info(f"CovidInfectionSeg: {text}")

        self.ui.installDependenciesButton.enabled = False
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
                # pip (and light-the-torch for torch) run in a child process that the timer polls.
                self._installation = self.dependencyLogic.startInstall(plan, log)
                self._installationPlan = plan
        finally:
            if self._installation is None:  # it raised (shown, then raised on by tryWithErrorDisplay)
                self.updateDependencyStatus()
        self.ui.installDependenciesButton.text = _("Cancel installation")
        self.ui.installDependenciesButton.enabled = True
        self._timer.start()

    def _pollInstallation(self) -> None:
        installation = self._installation
        finished = installation.poll()
        self.ui.dependencyStatusLabel.text = _("Installing {requirement} ({step} of {count}), {seconds} s:\n{line}").format(
            requirement=installation.requirement, step=installation.step, count=installation.stepCount,
            seconds=f"{installation.elapsedSeconds:.0f}", line=installation.lastLine)
        if installation.writing:
            self.ui.dependencyStatusLabel.text += "\n" + _("Writing the packages: this cannot be cancelled safely.")
        self.ui.installDependenciesButton.enabled = installation.cancellable
        if finished:
            self._finishInstallation()

    def _finishInstallation(self) -> None:
        from CovidInfectionSegSlicer.pip_installation import CANCELLED, FAILED

        installation, plan = self._installation, self._installationPlan
        self._installation = self._installationPlan = None
        self.ui.installDependenciesButton.text = _("Install missing packages")
        ready = self.updateDependencyStatus()
        seconds = f"{installation.elapsedSeconds:.0f}"
        if installation.state == CANCELLED:
            self.ui.statusLabel.text = _(
                "Installation cancelled after {seconds} s; the packages installed before it stay.").format(seconds=seconds)
        elif installation.state == FAILED:
            logging.error(f"CovidInfectionSeg: {installation.error}")
            slicer.util.errorDisplay(_("Installing Python packages failed:\n\n{error}").format(error=installation.error))
        elif plan.restart_needed and slicer.util.confirmYesNoDisplay(
            _("Packages that Slicer has already loaded were replaced: {reasons}.\n\n"
              "Slicer must restart to use them. Restart now?").format(reasons="; ".join(plan.restart_reasons))
        ):
            slicer.util.restart()
            return
        if ready:
            self.startDeviceQuery()


class CovidInfectionSegTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (Reload and Test, or ctest): the real CTChest sample, the bundled model, PythonSlicer."""

    def setUp(self):
        # Here, not in runTest: ctest (slicer.testing.runUnitTest) runs each test_ method on its own,
        # after setUp, and never calls runTest.
        from CovidInfectionSegSlicer.dependencies import check

        torchStatus, statuses = check()
        missing = [status.describe() for status in [torchStatus, *statuses] if not status.satisfied]
        if missing:
            self.skipTest("Python packages missing in Slicer (install them from the module panel): " + "; ".join(missing))
        slicer.mrmlScene.Clear()

    def runTest(self):
        import unittest

        try:
            self.setUp()
        except unittest.SkipTest as reason:  # Reload and Test calls runTest directly: no runner to report a skip
            self.delayDisplay(f"Skipped: {reason}")
            return
        self.test_CTChestLungVolumesAndTerminology()
        self.setUp()
        self.test_PanelCancelsThenSegments()

    def test_CTChestLungVolumesAndTerminology(self):
        import SampleData

        from CovidInfectionSegSlicer.logic import SegmentationLogic

        self.delayDisplay("Loading the CTChest sample")
        volume = SampleData.downloadSample("CTChest")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        applied = SegmentationLogic().process(volume)
        segmentation = applied.segmentationNode.GetSegmentation()
        names = [segmentation.GetSegment(segmentId).GetName() for segmentId in segmentation.GetSegmentIDs()]
        self.assertEqual(names, ["Right lung", "Left lung", "Infection"])
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        entry = vtk.reference("")
        self.assertTrue(segmentation.GetSegment("Right_lung").GetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry))
        self.assertIn("SCT^39607008^Lung~SCT^24028007^Right", str(entry))
        measurements = applied.measurements
        # An adult chest CT: litres of lung, both sides present.
        self.assertTrue(2000 < measurements.total.lung_ml < 9000, measurements)
        for side in (measurements.right_lung, measurements.left_lung):
            self.assertTrue(0.3 < side.lung_ml / measurements.total.lung_ml < 0.7, measurements)
        self.assertTrue(0 <= measurements.total.percent_infected <= 100)
        self.delayDisplay(f"Lungs {measurements.total.lung_ml:.0f} mL, infected {measurements.total.percent_infected:.1f}%")

    def test_PanelCancelsThenSegments(self):
        import os
        import time

        import SampleData

        from CovidInfectionSegLib.worker import HOLD_STAGE_ENV_VAR

        volume = SampleData.downloadSample("CTChest")
        widget = slicer.modules.covidinfectionseg.widgetRepresentation().self()
        # setUp cleared the scene; a panel that is not shown (the test run from the Self Tests module or
        # the console) took up no parameter node again, as entering the module would.
        widget.initializeParameterNode()
        widget.logic.getParameterNode().inputVolume = volume
        widget.logic.getParameterNode().outputSegmentation = None

        def waitFor(condition, seconds):
            deadline = time.monotonic() + seconds
            while not condition() and time.monotonic() < deadline:
                slicer.app.processEvents()  # the GUI stays live: the child process does the work
                time.sleep(0.05)
            return condition()

        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        # The child pauses once it reports the inference stage, so the timer sees that stage however
        # fast the GPU; the child it starts has the variable, the next run's does not.
        os.environ[HOLD_STAGE_ENV_VAR] = "inference"
        try:
            widget.ui.segmentButton.click()
        finally:
            del os.environ[HOLD_STAGE_ENV_VAR]
        self.assertEqual(widget.ui.segmentButton.text, "Cancel")
        self.assertTrue(waitFor(lambda: widget._run is not None and widget._run.stage == "inference", 300))
        widget.ui.segmentButton.click()  # cancel while segmenting
        self.assertIsNone(widget._run)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        self.assertTrue(widget.ui.noduleCheckBox.checked)  # on by default: small solid lesions are nodules
        userFlip = widget.ui.flipTTACheckBox.checked
        widget.ui.flipTTACheckBox.checked = True  # the check box reaches the parameter node and the engine
        self.assertTrue(widget.logic.getParameterNode().flipTTA)
        self.assertEqual(str(qt.QSettings().value(FLIP_TTA_SETTINGS_KEY)).lower(), "true")  # remembered
        widget.ui.segmentButton.click()
        self.assertTrue(waitFor(lambda: widget._run is None, 900), "segmentation did not finish within 15 minutes")
        self.assertEqual(widget.ui.segmentButton.text, "Segment")
        self.assertIsNotNone(widget.ui.resultsTableView.mrmlTableNode())
        output = widget.logic.getParameterNode().outputSegmentation
        self.assertEqual(output.GetAttribute("CovidInfectionSeg.flipTTA"), "true")
        self.assertEqual(output.GetAttribute("CovidInfectionSeg.noduleCheck"), "true")
        self.assertIn("with mirror averaging", widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.resultsTableView.mrmlTableNode().GetNumberOfRows(), 3)
        widget.ui.flipTTACheckBox.checked = userFlip  # the self-test leaves the user's choice as it found it
