"""The module's logic: segment a CT volume node in a child process and put the result into the scene.

One path serves the panel, the Python console and batch mode:

1. :meth:`SegmentationLogic.start` (main thread) writes the volume to a temporary file and starts
   the engine (``CovidInfectionSegLib.worker``) with the given interpreter: ``PythonSlicer`` in 3D
   Slicer, any Python with the engine's packages elsewhere (tests pass ``sys.executable``).
2. :meth:`SegmentationRun.poll` (main thread, from a timer) reads the child's progress lines; when the
   child has written its result it reads the labelmap and measurements back and puts them into the
   scene (:func:`results.applyResult`). :meth:`SegmentationRun.cancel` kills the child's process tree
   in any stage, and nothing is added.
3. :meth:`SegmentationLogic.process` does both in a blocking loop (console, batch) and returns the
   nodes, or raises :class:`EngineError` with the ``covidseg`` command's message.

Nothing here imports torch: the child does. The widget takes its logic as the protocols below.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Protocol

import SimpleITK as sitk

from CovidInfectionSegLib import worker
from CovidInfectionSegLib.itk_paths import itk_path
from CovidInfectionSegLib.validation import InputError

from .engine_process import EngineProcess, findPythonSlicer
from .i18n import tr as _
from .results import AppliedSegmentation, applyResult, showIn3D
from .volumes import nodeLabel, volumeNodeToImage

INPUT_FILE = "input.nrrd"
POLL_SECONDS = 0.05
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class EngineError(RuntimeError):
    """The engine reported an error (``kind``: input, device, model, internal) or stopped without a result."""

    def __init__(self, message: str, kind: str = "internal", exitCode: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.exitCode = exitCode


class SegmentationCancelled(Exception):
    """The segmentation was cancelled; nothing was added to the scene."""


# ------------------------------------------------------------------------------------- protocols


class SegmentationRunProtocol(Protocol):
    """One segmentation in progress, as the widget sees it."""

    state: str  # RUNNING, SUCCEEDED, FAILED or CANCELLED
    stage: Optional[str]  # one of CovidInfectionSegLib.worker.STAGES once the child reports it
    slicesDone: int
    slicesTotal: int
    error: Optional[Exception]
    applied: Optional[AppliedSegmentation]

    @property
    def elapsedSeconds(self) -> float: ...

    def poll(self) -> bool: ...

    def cancel(self) -> float: ...


class DeviceQueryProtocol(Protocol):
    """What torch and CUDA the engine's interpreter has, asked from a child process."""

    info: Optional[dict[str, Any]]
    error: Optional[str]

    def poll(self) -> bool: ...

    def cancel(self) -> float: ...


class SegmentationLogicProtocol(Protocol):
    """What the widget needs from the segmentation logic."""

    def start(self, inputVolume: Any, outputSegmentation: Any = None, device: str = "auto",
              flipTTA: bool = False, noduleCheck: bool = True) -> SegmentationRunProtocol: ...

    def queryDevice(self, device: str = "auto") -> DeviceQueryProtocol: ...

    def showIn3D(self, segmentationNode: Any) -> None: ...


# ------------------------------------------------------------------------------------------- runs


class SegmentationRun:
    """One segmentation in a child process; drive it with :meth:`poll` from the main thread."""

    def __init__(self, process: EngineProcess, inputVolume: Any, outputSegmentation: Any, folder: Path):
        self._process = process
        self._inputVolume = inputVolume
        self._outputSegmentation = outputSegmentation
        self._folder = folder
        self._resultFiles: tuple[str, str] | None = None
        self._errorMessage: dict[str, Any] | None = None
        self._startTime = time.monotonic()
        self._endTime: float | None = None
        self.state = RUNNING
        self.stage: str | None = None
        self.slicesDone = 0
        self.slicesTotal = 0
        self.error: Exception | None = None
        self.applied: AppliedSegmentation | None = None

    @property
    def pid(self) -> int:
        """Process id of the child (its process group on POSIX)."""
        return self._process.pid

    @property
    def folder(self) -> Path:
        """The temporary folder of the input file and the child's output; removed when the run ends."""
        return self._folder

    @property
    def elapsedSeconds(self) -> float:
        return (self._endTime or time.monotonic()) - self._startTime

    def poll(self) -> bool:
        """Take in the child's new messages; when it has exited, finish (result into the scene, or the
        error). Returns True once the run is over. Call on the main thread."""
        if self.state != RUNNING:
            return True
        try:
            for message in self._process.poll():
                self._take(message)
            if self._process.running:
                return False
        except OSError as error:  # the child's output file vanished (temporary folder cleaned up under us)
            self._process.cancel()
            self.error, self.state = EngineError(f"lost contact with the engine: {error}"), FAILED
            self._close()
            return True
        self._finish()
        return True

    def cancel(self) -> float:
        """Kill the child's process tree; nothing is added to the scene. Returns the seconds it took."""
        if self.state != RUNNING:
            return 0.0
        seconds = self._process.cancel()
        self.state = CANCELLED
        self.error = SegmentationCancelled("cancelled; nothing was added to the scene")
        self._close()
        return seconds

    def _take(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if event == "stage":
            self.stage = str(message.get("stage"))
        elif event == "progress":
            self.slicesDone, self.slicesTotal = int(message["done"]), int(message["total"])
        elif event == "result":
            self._resultFiles = (str(message["labelmap"]), str(message["result"]))
        elif event == "error":
            self._errorMessage = message

    def _finish(self) -> None:
        try:
            self.applied = self._applyOrRaise()
            self.state = SUCCEEDED
        except Exception as error:  # reported to the caller, which decides how to show it
            self.error = error
            self.state = FAILED
        finally:
            self._close()

    def _applyOrRaise(self) -> AppliedSegmentation:
        if self._errorMessage is not None:
            message = self._errorMessage
            raise EngineError(str(message.get("message")), str(message.get("kind", "internal")), message.get("exit_code"))
        if self._resultFiles is None:
            details = self._process.stderrTail()
            raise EngineError(_("the engine stopped without a result (exit code {code})").format(
                code=self._process.returncode) + (f":\n{details}" if details else ""))
        if self._inputVolume.GetScene() is None:
            raise InputError(_("{volume} was removed from the scene while segmenting; nothing was added").format(
                volume=nodeLabel(self._inputVolume)))
        if self._outputSegmentation is not None and self._outputSegmentation.GetScene() is None:
            raise InputError(_("the output segmentation was removed from the scene while segmenting; nothing was added"))
        result = worker.read_result(*self._resultFiles)
        return applyResult(result, self._inputVolume, self._outputSegmentation)

    def _close(self) -> None:
        self._endTime = time.monotonic()
        self._inputVolume = self._outputSegmentation = None
        shutil.rmtree(self._folder, ignore_errors=True)


class DeviceQuery:
    """``worker device`` in a child process: torch version, CUDA, the device ``auto`` picks."""

    def __init__(self, interpreter: str, device: str = "auto"):
        self._folder = Path(tempfile.mkdtemp(prefix="CovidInfectionSeg-device-"))
        try:
            self._process = EngineProcess(interpreter, ["device", "--device", device], self._folder)
        except BaseException:  # no such interpreter: leave no folder behind
            shutil.rmtree(self._folder, ignore_errors=True)
            raise
        self.info: dict[str, Any] | None = None
        self.error: str | None = None

    @property
    def folder(self) -> Path:
        """The temporary folder of the child's output; removed when the query ends."""
        return self._folder

    @property
    def pid(self) -> int:
        return self._process.pid

    def poll(self) -> bool:
        """True once the answer (``info``) or an ``error`` is in."""
        if self.info is not None or self.error is not None:
            return True
        try:
            for message in self._process.poll():
                if message["event"] == "device":
                    self.info = message
                elif message["event"] == "error":
                    self.error = str(message.get("message"))
            if self._process.running:
                return False
        except OSError as error:  # the child's output file vanished (temporary folder cleaned up under us)
            self.cancel()
            self.error = f"lost contact with the engine: {error}"
            return True
        if self.info is None and self.error is None:
            tail = self._process.stderrTail(3)
            self.error = f"the engine could not start (exit code {self._process.returncode}): {tail}"
        shutil.rmtree(self._folder, ignore_errors=True)
        return True

    def cancel(self) -> float:
        seconds = self._process.cancel()
        shutil.rmtree(self._folder, ignore_errors=True)
        return seconds


# ------------------------------------------------------------------------------------------ logic


class SegmentationLogic:
    """Segment lungs and COVID-19 infection of a CT volume node into a segmentation node and a table.

    >>> logic = SegmentationLogic()                      # PythonSlicer, bundled model
    >>> applied = logic.process(volumeNode)              # blocking
    >>> applied.segmentationNode, applied.tableNode, applied.measurements.total.percent_infected
    """

    def __init__(self, interpreter: str | None = None, model: str | Path | None = None, batchSize: int | None = None):
        """``interpreter``: the Python that runs the engine (default: Slicer's ``PythonSlicer``);
        ``model``: a manifest or ``.pt`` path (default: the bundled model); ``batchSize``: slices per batch."""
        self.interpreter = interpreter
        self.model = model
        self.batchSize = batchSize

    def start(self, inputVolume: Any, outputSegmentation: Any = None, device: str = "auto",
              flipTTA: bool = False, noduleCheck: bool = True) -> SegmentationRun:
        """Check and write ``inputVolume``, start the child; raises InputError before starting for a bad volume.

        ``flipTTA`` averages each slice with its left-right mirror: twice the network time; with model v1,
        less false infection on three of four healthy scans (``training/results/flip_tta_v1.md``).
        ``noduleCheck=False`` keeps small solid infection components as infection; by default the engine
        takes them for nodules and makes them lung (the model card's *Nodule check*)."""
        image = volumeNodeToImage(inputVolume)
        if outputSegmentation is not None and outputSegmentation.GetScene() is not inputVolume.GetScene():
            raise InputError(_("segmentation '{name}': the node is not in the input's scene").format(
                name=outputSegmentation.GetName()))
        interpreter = self.interpreter or findPythonSlicer()
        folder = Path(tempfile.mkdtemp(prefix="CovidInfectionSeg-"))
        try:
            sitk.WriteImage(image, itk_path(folder / INPUT_FILE))
            del image
            arguments = ["segment", "--input", folder / INPUT_FILE, "--output-dir", folder, "--device", device,
                         "--name", nodeLabel(inputVolume)]
            if flipTTA:
                arguments.append("--flip-tta")
            if not noduleCheck:
                arguments.append("--no-nodule-check")
            if self.batchSize:
                arguments += ["--batch-size", self.batchSize]
            if self.model is not None:
                arguments += ["--model", Path(self.model).resolve()]
            process = EngineProcess(interpreter, arguments, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return SegmentationRun(process, inputVolume, outputSegmentation, folder)

    def process(self, inputVolume: Any, outputSegmentation: Any = None, device: str = "auto",
                timeout: float | None = None, flipTTA: bool = False, noduleCheck: bool = True) -> AppliedSegmentation:
        """Segment ``inputVolume`` into ``outputSegmentation`` (a new node when None) and wait.

        Returns the nodes and measurements. Raises InputError, :class:`EngineError` (the engine's
        message; ``kind`` says input, device, model or internal) or TimeoutError; the scene is
        unchanged when it raises. Ctrl-C (KeyboardInterrupt) kills the child first.
        """
        run = self.start(inputVolume, outputSegmentation, device, flipTTA, noduleCheck)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not run.poll():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(_("{volume}: the segmentation took more than {seconds:.0f} s").format(
                        volume=nodeLabel(inputVolume), seconds=timeout))
                time.sleep(POLL_SECONDS)
        finally:
            run.cancel()  # no-op when finished
        if run.error is not None:
            raise run.error
        assert run.applied is not None
        return run.applied

    def queryDevice(self, device: str = "auto") -> DeviceQuery:
        """Ask the engine's interpreter about torch and CUDA (a child process: no torch import here)."""
        return DeviceQuery(self.interpreter or findPythonSlicer(), device)

    @staticmethod
    def showIn3D(segmentationNode: Any) -> None:
        """Build closed surfaces so the segments show in 3D views."""
        showIn3D(segmentationNode)
