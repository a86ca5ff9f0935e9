"""Install Python packages with pip in a child process, one requirement after another, polled by a timer.

``slicer.util.pip_install`` runs pip on the GUI thread and lets Qt handle events only between the
lines pip prints (Slicer 5.6 to 5.10). pip prints nothing while it downloads torch (1-3 GB), so Slicer
froze for minutes and could not be stopped. Here each pip call is the same command Slicer runs,
``PythonSlicer -m pip install ...`` (for torch, ``-m light_the_torch install ...``, which wraps pip), in a
:class:`ChildProcess`: the panel polls it, shows pip's last line and the seconds gone, and can cancel
it. It cannot be cancelled once pip has begun to write into site-packages ("Installing collected
packages"): killing pip there can leave a package half replaced. Plain Python: no Slicer, no Qt.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from .child_process import ChildProcess
from .i18n import tr as _

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
# pip prints this just before it uninstalls old versions and writes the new ones.
WRITING_MARKER = "Installing collected packages"


@dataclass(frozen=True)
class PipStep:
    """One pip call: the requirement it installs and the tool that installs it (for messages), and its
    command line."""

    requirement: str
    command: list[str]
    tool: str = "pip"


def pip_steps(interpreter: str, requirements: Sequence[str], pins: Sequence[str] = ()) -> list[PipStep]:
    """``interpreter -m pip install <requirement> <pins>`` for each requirement, in order. The pins are
    already satisfied, so pip installs nothing for them; they only stop it from replacing them."""
    return [PipStep(requirement, [str(interpreter), "-m", "pip", "install", requirement, *pins])
            for requirement in requirements]


class InstallationProtocol(Protocol):
    """What the panel needs of a running installation."""

    state: str
    error: str | None
    lastLine: str

    @property
    def step(self) -> int: ...

    @property
    def stepCount(self) -> int: ...

    @property
    def requirement(self) -> str: ...

    @property
    def cancellable(self) -> bool: ...

    @property
    def elapsedSeconds(self) -> float: ...

    @property
    def writing(self) -> bool: ...

    def poll(self) -> bool: ...

    def cancel(self, wait: bool = False) -> bool: ...


class PipInstallation:
    """:func:`pip_steps` run one after the other, each in a child process; stops at the first failure.

    >>> installation = PipInstallation(pip_steps(findPythonSlicer(), ["scipy>=1.7"]))
    >>> while not installation.poll(): time.sleep(0.2)   # a QTimer in the panel
    >>> installation.state, installation.error
    """

    def __init__(self, steps: Sequence[PipStep], log: Callable[[str], None] = print):
        """Starts the first step. Raises OSError when its interpreter cannot be started (nothing is left behind)."""
        self._steps = list(steps)
        self._log = log
        self._folder = Path(tempfile.mkdtemp(prefix="CovidInfectionSeg-pip-"))
        self._startTime = time.monotonic()
        self._endTime: float | None = None
        self._index = 0
        self._child: ChildProcess | None = None
        self._writing = False
        self.state = RUNNING
        self.error: str | None = None
        self.lastLine = ""
        try:
            self._startStep()
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise

    @property
    def step(self) -> int:
        """1-based number of the step running (or the last one run)."""
        return min(self._index + 1, len(self._steps))

    @property
    def stepCount(self) -> int:
        return len(self._steps)

    @property
    def requirement(self) -> str:
        return self._steps[self.step - 1].requirement if self._steps else ""

    @property
    def writing(self) -> bool:
        """pip writes into site-packages now (as far as its output has been read)."""
        return self.state == RUNNING and self._writing

    @property
    def cancellable(self) -> bool:
        """False once pip writes into site-packages: stopping it then could leave a package half replaced."""
        return self.state == RUNNING and not self._writing

    @property
    def elapsedSeconds(self) -> float:
        return (self._endTime or time.monotonic()) - self._startTime

    def poll(self) -> bool:
        """Read what pip printed and go on to the next step when one ends; True once finished (never blocks)."""
        if self.state != RUNNING:
            return True
        try:
            self._readOutput()
        except OSError as error:  # its temporary folder was removed under it
            self._child.cancel()
            self._finish(FAILED, _("the output of {tool} could not be read ({error}); it was stopped").format(
                tool=self._steps[self._index].tool, error=error))
            return True
        if self._child.running:
            return False
        exitCode = self._child.returncode
        if exitCode != 0:
            tail = self._child.stderrTail(8) or self.lastLine
            tool = self._steps[self._index].tool
            self._finish(FAILED, _("{tool} could not install {requirement} (exit code {code}):").format(
                tool=tool, requirement=self.requirement, code=exitCode) + "\n" + tail)
            return True
        self._index += 1
        try:
            self._startStep()
        except OSError as error:
            self._finish(FAILED, _("{tool} could not be started for {requirement}: {error}").format(
                tool=self._steps[self._index].tool, requirement=self.requirement, error=error))
        return self.state != RUNNING

    def cancel(self, wait: bool = False) -> bool:
        """Stop pip unless it is writing packages (see :attr:`cancellable`); returns whether it stopped.
        With ``wait``, a pip that is writing is waited for (it blocks), and the steps after it are not run."""
        if self.state != RUNNING:
            return False
        with contextlib.suppress(OSError):
            self._readOutput()  # pip may have begun writing since the last poll
        if self._writing:
            if not wait:
                return False
            self._child.wait()
        else:
            self._child.cancel()
        self._finish(CANCELLED)
        return True

    def _readOutput(self) -> None:
        for line in self._child.readLines():
            text = line.strip()
            if not text:
                continue
            self.lastLine = text
            self._writing = self._writing or text.startswith(WRITING_MARKER)
            self._log(text)

    def _startStep(self) -> None:
        if self._index >= len(self._steps):
            self._finish(DONE)
            return
        step = self._steps[self._index]
        self._writing = False
        self._log(_("{tool}: installing {requirement} ({number} of {count})").format(
            tool=step.tool, requirement=step.requirement, number=self._index + 1, count=len(self._steps)))
        # Unbuffered: pip's lines reach the file, and the panel, as pip prints them; in UTF-8, which
        # ChildProcess reads, whatever the Windows code page.
        self._child = ChildProcess(step.command, self._folder, name=f"pip{self._index + 1}",
                                   environment={"PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})

    def _finish(self, state: str, error: str | None = None) -> None:
        self.state, self.error = state, error
        self._endTime = time.monotonic()
        shutil.rmtree(self._folder, ignore_errors=True)
