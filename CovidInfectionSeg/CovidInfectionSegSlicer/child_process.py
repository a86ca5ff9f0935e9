"""A command in a child process, read without blocking and killed with everything it started.

Its stdout and stderr go to files in a folder the caller owns, and :meth:`ChildProcess.readLines`
returns the lines added since the last call, so a timer on the GUI thread can drive it: no threads,
no pipes that fill up. :meth:`ChildProcess.cancel` kills the child's whole process tree (a new
process group on POSIX, ``taskkill /T`` on Windows) and waits until it has exited. Plain Python:
no Slicer, no Qt.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

KILL_WAIT_SECONDS = 10.0


class ChildProcess:
    """One command in a child process, its output in ``<folder>/<name>-stdout.log`` and ``-stderr.log``.

    >>> child = ChildProcess([sys.executable, "-m", "pip", "--version"], folder, name="pip")
    >>> while child.running: lines = child.readLines(); ...
    """

    def __init__(self, command: Sequence[str], folder: str | Path, name: str, cwd: str | Path | None = None,
                 environment: Mapping[str, str] | None = None):
        """``environment``: variables set for the child on top of this process's own."""
        self.folder = Path(folder)
        self.command = [str(part) for part in command]
        self._stdoutPath = self.folder / f"{name}-stdout.log"
        self._stderrPath = self.folder / f"{name}-stderr.log"
        with open(self._stdoutPath, "wb") as stdout, open(self._stderrPath, "wb") as stderr:
            self._process = subprocess.Popen(
                self.command, cwd=None if cwd is None else str(cwd), stdin=subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, env=None if environment is None else {**os.environ, **environment},
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
        """True until the child has exited and every line it wrote has been returned by :meth:`readLines`."""
        return self.returncode is None or self._hasUnreadOutput()

    def readLines(self) -> list[str]:
        """The stdout lines written since the last call, without their line ends (never blocks)."""
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
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]

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
