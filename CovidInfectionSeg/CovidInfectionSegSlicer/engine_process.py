"""Start the engine in a child process, read its progress without blocking, kill it on cancel.

The child is ``<interpreter> -m CovidInfectionSegLib.worker ...`` (see that module for the protocol):
3D Slicer passes its ``PythonSlicer``, tests pass ``sys.executable``. :class:`ChildProcess` does the
process work (output in files, polled by a timer, the whole tree killed on cancel); this adds the
engine's command line and its protocol messages. Plain Python: no Slicer, no Qt.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from CovidInfectionSegLib import worker

from .child_process import ChildProcess
from .i18n import tr as _

WORKER_MODULE = "CovidInfectionSegLib.worker"
# The folder holding the CovidInfectionSegLib package: the child starts there, so ``-m`` finds the
# same engine as this process even when another copy is installed in the interpreter.
ENGINE_ROOT = Path(worker.__file__).resolve().parents[1]


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
    raise RuntimeError(_("PythonSlicer (3D Slicer's Python interpreter) was not found on PATH or beside "
                         "{executable}; the segmentation runs with it in a separate process").format(executable=sys.executable))


class EngineProcess(ChildProcess):
    """One engine command in a child process.

    >>> process = EngineProcess(sys.executable, ["device"], folder)
    >>> while process.running: messages = process.poll(); ...
    """

    def __init__(self, interpreter: str, arguments: Sequence[str], folder: str | Path):
        super().__init__([str(interpreter), "-m", WORKER_MODULE, *map(str, arguments)], folder, name="engine",
                         cwd=ENGINE_ROOT)

    def poll(self) -> list[dict[str, Any]]:
        """The protocol messages written since the last call (never blocks)."""
        messages = (worker.parse_message(line) for line in self.readLines())
        return [message for message in messages if message is not None]
