"""Helpers for fault-injection tests: start a real child process that stops at a pause point of
``atomic.pause_point`` ($COVIDSEG_TEST_PAUSE_AT / $COVIDSEG_TEST_PAUSE_FILE), kill it with SIGKILL or let
it go on, and compare output folders (visible files byte for byte, hidden leftovers)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from CovidInfectionSegLib.atomic import COMMIT_LOCK_NAME, PAUSE_AT_ENV, PAUSE_FILE_ENV

CHILD_TIMEOUT_S = 300


def start_paused(command: list[str], point: str, pause_file: Path) -> subprocess.Popen:
    """Start ``command`` and return once it waits at the pause ``point`` (its pid is in ``pause_file``)."""
    env = {**os.environ, PAUSE_AT_ENV: point, PAUSE_FILE_ENV: str(pause_file), "PYTHONUNBUFFERED": "1"}
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not pause_file.exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"exited with {child.returncode} before reaching {point}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            child.kill()
            child.communicate()
            pytest.fail(f"did not reach {point} within {CHILD_TIMEOUT_S} s")
        time.sleep(0.02)
    assert int(pause_file.read_text().split()[0]) == child.pid
    return child


def kill_9(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.communicate(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL


def release(child: subprocess.Popen, pause_file: Path) -> tuple[int, str, str]:
    pause_file.unlink()
    out, err = child.communicate(timeout=CHILD_TIMEOUT_S)
    return child.returncode, out, err


def visible(folder: Path) -> dict[str, bytes]:
    """Every non-hidden file under ``folder`` (relative path -> bytes)."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}


def leftovers(folder: Path) -> list[str]:
    """Hidden entries under ``folder`` other than the lock files that stay by design."""
    kept = {COMMIT_LOCK_NAME, ".covidseg-batch.lock", ".covidseg-batch.owner"}
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob(".*") if path.name not in kept)
