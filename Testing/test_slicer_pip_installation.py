"""pip in a child process for the Slicer panel (CovidInfectionSegSlicer.pip_installation): real pip,
offline, from wheels built here, into a folder of the test's (pip's own PIP_* environment variables
reach the child, as they would in Slicer)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from CovidInfectionSegSlicer.pip_installation import (
    CANCELLED,
    DONE,
    FAILED,
    RUNNING,
    PipInstallation,
    PipStep,
    pip_steps,
)
from local_wheels import build_wheel


def run_to_end(installation: PipInstallation, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not installation.poll():
        assert time.monotonic() < deadline, f"pip still running after {seconds} s: {installation.lastLine}"
        time.sleep(0.05)


@pytest.fixture
def offline_pip(tmp_path, monkeypatch) -> Path:
    """pip finds only the wheels in ``tmp_path/wheels`` and installs into ``tmp_path/target``; the
    temporary folders of the installation go to ``tmp_path/tmp``."""
    wheels, target, temporary = tmp_path / "wheels", tmp_path / "target", tmp_path / "tmp"
    for folder in (wheels, target, temporary):
        folder.mkdir()
    for name in ("covidseg-test-a", "covidseg-test-b"):
        build_wheel(wheels, name)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_TARGET", str(target))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    monkeypatch.setattr("tempfile.tempdir", str(temporary))
    return tmp_path


def test_steps_run_in_order_and_leave_no_folder(offline_pip):
    lines = []
    installation = PipInstallation(pip_steps(sys.executable, ["covidseg-test-a", "covidseg-test-b"]), lines.append)
    assert installation.state == RUNNING and installation.stepCount == 2
    run_to_end(installation)
    assert installation.state == DONE and installation.error is None
    assert sorted(path.name for path in (offline_pip / "target").glob("*.py")) == ["covidseg_test_a.py", "covidseg_test_b.py"]
    assert lines.index("pip: installing covidseg-test-a (1 of 2)") < lines.index("pip: installing covidseg-test-b (2 of 2)")
    assert any(line.startswith("Successfully installed covidseg-test-b") for line in lines), lines
    assert installation.lastLine.startswith("Successfully installed covidseg-test-b")
    assert list((offline_pip / "tmp").iterdir()) == []


def test_a_failing_step_stops_the_rest_and_names_the_requirement_with_pips_message(offline_pip):
    steps = pip_steps(sys.executable, ["covidseg-test-a", "no-such-package-covidseg-test", "covidseg-test-b"])
    installation = PipInstallation(steps, lambda _line: None)
    run_to_end(installation)
    assert installation.state == FAILED and installation.step == 2
    assert installation.error.startswith("pip could not install no-such-package-covidseg-test (exit code 1):")
    assert "No matching distribution found for no-such-package-covidseg-test" in installation.error
    assert [path.name for path in (offline_pip / "target").glob("*.py")] == ["covidseg_test_a.py"]
    assert list((offline_pip / "tmp").iterdir()) == []


def test_cancel_while_pip_waits_for_the_index_kills_it_and_installs_nothing(offline_pip, monkeypatch):
    """An index that accepts the connection and never answers: pip waits, as it does during a long download."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    connected = threading.Event()
    accepted = []

    def accept():
        connection, _ = server.accept()
        accepted.append(connection)
        connected.set()

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.getsockname()[1]}/simple")
    monkeypatch.setenv("PIP_TIMEOUT", "120")
    try:
        installation = PipInstallation(pip_steps(sys.executable, ["covidseg-test-a"]), lambda _line: None)
        assert connected.wait(120), "pip never asked the index"
        assert not installation.poll() and installation.cancellable
        started = time.monotonic()
        assert installation.cancel()
        assert time.monotonic() - started < 10
        assert installation.state == CANCELLED and installation.poll()
        with pytest.raises(ProcessLookupError):
            os.kill(installation._child.pid, 0)  # the child is gone, not left waiting on the index
        assert list((offline_pip / "target").iterdir()) == []
        assert list((offline_pip / "tmp").iterdir()) == []
    finally:
        for connection in accepted:
            connection.close()
        server.close()


def test_once_pip_writes_packages_it_is_not_cancelled(tmp_path, monkeypatch):
    """A child that prints pip's line before it writes into site-packages, then waits for a file."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    go_on = tmp_path / "go-on"
    script = ("import os, time\nprint('Installing collected packages: covidseg-test-a')\n"
              f"while not os.path.exists({str(go_on)!r}): time.sleep(0.05)\nprint('Successfully installed')\n")
    installation = PipInstallation([PipStep("covidseg-test-a", [sys.executable, "-c", script])], lambda _line: None)
    deadline = time.monotonic() + 60
    while not installation.lastLine.startswith("Installing collected packages"):
        assert not installation.poll() and time.monotonic() < deadline
        time.sleep(0.05)
    assert not installation.cancellable and installation.writing
    assert not installation.cancel()
    assert installation.state == RUNNING
    go_on.touch()
    run_to_end(installation)
    assert installation.state == DONE and installation.lastLine == "Successfully installed"


def writing_child(tmp_path: Path, steps: int = 1) -> tuple[PipInstallation, Path]:
    """Children that print pip's line before it writes into site-packages, then wait for a file."""
    go_on = tmp_path / "go-on"
    script = ("import os, time\nprint('Installing collected packages: covidseg-test-a', flush=True)\n"
              f"while not os.path.exists({str(go_on)!r}): time.sleep(0.05)\n")
    steps = [PipStep(f"covidseg-test-{k}", [sys.executable, "-c", script]) for k in range(steps)]
    return PipInstallation(steps, lambda _line: None), go_on


def test_cancel_reads_what_pip_printed_since_the_last_poll(tmp_path, monkeypatch):
    """A click on Cancel between two timer ticks, just after pip began writing: not cancelled."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    installation, go_on = writing_child(tmp_path)
    stdout = next(tmp_path.glob("CovidInfectionSeg-pip-*/pip1-stdout.log"))
    deadline = time.monotonic() + 60
    while b"Installing collected packages" not in stdout.read_bytes():  # printed, never polled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not installation.cancel()
    assert installation.state == RUNNING and installation.writing
    go_on.touch()
    run_to_end(installation)
    assert installation.state == DONE


def test_cancel_with_wait_lets_a_writing_pip_finish_and_runs_no_further_step(tmp_path, monkeypatch):
    """What the panel does on reload or close: pip is not killed mid-write, nor left running untracked."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    installation, go_on = writing_child(tmp_path, steps=2)
    while not installation.writing:
        assert not installation.poll()
        time.sleep(0.05)
    threading.Timer(0.5, go_on.touch).start()
    started = time.monotonic()
    assert installation.cancel(wait=True)
    assert time.monotonic() - started >= 0.4  # it waited for the child to finish writing
    assert installation.state == CANCELLED and installation.step == 1
    assert list(tmp_path.glob("CovidInfectionSeg-pip-*")) == []


def test_an_interpreter_that_does_not_exist_raises_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(OSError):
        PipInstallation(pip_steps(str(tmp_path / "no-such-python"), ["covidseg-test-a"]), lambda _line: None)
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_install_is_done_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    installation = PipInstallation([], lambda _line: None)
    assert installation.state == DONE and installation.poll() and not installation.cancellable
    assert list(tmp_path.iterdir()) == []


def test_what_the_child_installed_is_seen_here_at_once(offline_pip, monkeypatch):
    """The panel checks the packages again in its own process right after pip's child finished."""
    from CovidInfectionSegSlicer.dependencies import module_available

    monkeypatch.syspath_prepend(str(offline_pip / "target"))
    assert not module_available("covidseg_test_a")  # looked up once: the folder's listing is cached
    run_to_end(PipInstallation(pip_steps(sys.executable, ["covidseg-test-a"]), lambda _line: None))
    assert module_available("covidseg_test_a")
