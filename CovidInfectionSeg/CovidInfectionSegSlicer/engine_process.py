"""Start the engine in a child process, read its progress without blocking, kill it on cancel.

The child is ``<interpreter> -m CovidInfectionSegLib.worker ...`` (see that module for the protocol):
3D Slicer passes its ``PythonSlicer``, tests pass ``sys.executable``. Its stdout and stderr go to
files in a folder the caller owns, and :meth:`EngineProcess.poll` reads what was added since the
last call, so a timer on the GUI thread can drive it: no threads, no pipes that fill up.
:meth:`EngineProcess.cancel` kills the child's whole process tree (a new process group on POSIX,
``taskkill /T`` on Windows) and waits until it has exited. Plain Python: no Slicer, no Qt.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from CovidInfectionSegLib import worker

WORKER_MODULE = "CovidInfectionSegLib.worker"
# The folder holding the CovidInfectionSegLib package: the child starts there, so ``-m`` finds the
# same engine as this process even when another copy is installed in the interpreter.
ENGINE_ROOT = Path(worker.__file__).resolve().parents[1]
STDOUT_FILE = "engine-stdout.log"
STDERR_FILE = "engine-stderr.log"
KILL_WAIT_SECONDS = 10.0


def findPythonSlicer() -> str:
    """Path of 3D Slicer's ``PythonSlicer`` (what ``slicer.util.pip_install`` runs pip with).

    Inside Slicer it is on PATH; beside the application executable otherwise. Raises RuntimeError.
    """
    found = shutil.which("PythonSlicer")
    if found:
        return found
    beside = Path(sys.executable).parent / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if beside.is_file():
        return str(beside)
    raise RuntimeError("PythonSlicer (3D Slicer's Python interpreter) was not found on PATH or beside "
                       f"{sys.executable}; the segmentation runs with it in a separate process")


class EngineProcess:
    """One engine command in a child process.

    >>> process = EngineProcess(sys.executable, ["device"], folder)
    >>> while process.running: messages = process.poll(); ...
    """

    def __init__(self, interpreter: str, arguments: Sequence[str], folder: str | Path):
        self.folder = Path(folder)
        self.command = [str(interpreter), "-m", WORKER_MODULE, *map(str, arguments)]
        self._stdoutPath = self.folder / STDOUT_FILE
        self._stderrPath = self.folder / STDERR_FILE
        with open(self._stdoutPath, "wb") as stdout, open(self._stderrPath, "wb") as stderr:
            self._process = subprocess.Popen(
                self.command, cwd=str(ENGINE_ROOT), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                **_ownProcessGroup(),
            )
        self._offset = 0
        self._partial = b""
        self.cancelled = False

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        return self._process.poll()

    @property
    def running(self) -> bool:
        """True until the child has exited and every line it wrote has been returned by :meth:`poll`."""
        return self.returncode is None or self._hasUnreadOutput()

    def poll(self) -> list[dict[str, Any]]:
        """The protocol messages written since the last call (never blocks)."""
        exited = self._process.poll() is not None
        with open(self._stdoutPath, "rb") as stdout:
            stdout.seek(self._offset)
            data = stdout.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if exited and self._partial and not self._hasUnreadOutput():
            lines.append(self._partial)  # the last line, without its newline
            self._partial = b""
        messages = (worker.parse_message(line.decode("utf-8", "replace").rstrip("\r")) for line in lines)
        return [message for message in messages if message is not None]

    def wait(self, timeout: float | None = None) -> int:
        """Block until the child exits; returns its exit code (raises subprocess.TimeoutExpired)."""
        return self._process.wait(timeout)

    def cancel(self) -> float:
        """Kill the child and everything it started; returns the seconds until it had exited."""
        started = time.perf_counter()
        self.cancelled = True
        if self._process.poll() is None:
            _killTree(self._process)
        self._process.wait(KILL_WAIT_SECONDS)
        return time.perf_counter() - started

    def stderrTail(self, lines: int = 15) -> str:
        """The end of what the child wrote on stderr (a traceback, library warnings)."""
        try:
            text = self._stderrPath.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _hasUnreadOutput(self) -> bool:
        try:
            return self._stdoutPath.stat().st_size > self._offset
        except OSError:
            return False


def _ownProcessGroup() -> dict[str, Any]:
    """Popen options that put the child in a group of its own (so its tree can be killed), with no console window."""
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _killTree(process: subprocess.Popen) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
        if process.poll() is None:
            process.kill()
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the child leads its own session, so its group id is its pid
    except ProcessLookupError:
        pass
