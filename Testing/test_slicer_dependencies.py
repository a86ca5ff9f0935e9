"""What the module installs inside Slicer: the pure decision logic of CovidInfectionSegSlicer.dependencies."""

from __future__ import annotations

import sys
import time

import pytest

from packaging.version import Version

from CovidInfectionSegSlicer import dependencies
from CovidInfectionSegSlicer.dependencies import (
    DependencyLogic,
    check,
    import_name,
    package_status,
    pinned_versions,
    plan_installation,
    installation_steps,
    read_requirements,
    start_install,
)
from CovidInfectionSegSlicer.pip_installation import FAILED, pip_steps

# What each supported Slicer ships (SuperBuild/External_python*.cmake of its tag): Python, numpy.
SLICER_PYTHONS = {"5.6.2": ("3.9", "1.26.1"), "5.8.1": ("3.9", "1.26.4"), "5.10.0": ("3.12", "2.0.2")}


def environment(installed: dict[str, str], importable: set[str]):
    """(version_of, importable) lookups describing a pretend Python environment."""
    return installed.get, importable.__contains__


def test_the_real_requirements_file_parses_and_is_satisfied_here():
    requirements = read_requirements()
    assert {r.name for r in requirements} >= {"opencv-python-headless", "scipy", "slicerio"}
    torch_status, statuses = check()  # this test environment has everything installed
    assert torch_status.satisfied
    assert all(status.satisfied for status in statuses), [s.describe() for s in statuses]


def test_bad_requirement_line_names_file_and_line(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nscipy>=1.7\nnot a requirement!!\n")
    with pytest.raises(ValueError, match=r"requirements.txt:3: not a valid requirement"):
        read_requirements(path)


def test_any_opencv_distribution_satisfies_the_headless_requirement():
    version_of, importable = environment({"opencv-python": "4.9.0"}, {"cv2"})
    status = package_status("opencv-python-headless>=4.5", version_of, importable)
    assert status.module == "cv2" and status.version == "4.9.0" and status.satisfied


def test_missing_old_and_marker_excluded_packages():
    version_of, importable = environment({"scipy": "1.5.0", "torch": "2.1.0"}, {"scipy", "torch"})
    torch_status, statuses = check(
        ["scipy>=1.7", "slicerio>=1.0", "pywin32; sys_platform == 'nonexistent-os'"],
        version_of=version_of, importable=importable,
    )
    assert torch_status.satisfied
    assert [s.requirement.name for s in statuses] == ["scipy", "slicerio"]  # the marker excludes pywin32
    assert [s.satisfied for s in statuses] == [False, False]
    assert statuses[0].describe() == "scipy: version 1.5.0 installed, need scipy>=1.7"
    assert statuses[1].describe() == "slicerio: missing (need slicerio>=1.0)"


def test_plan_uses_light_the_torch_as_the_pytorch_extension_when_present_and_pip_otherwise():
    version_of, importable = environment({"scipy": "1.5.0"}, {"scipy"})
    torch_status, statuses = check(["scipy>=1.7", "slicerio"], version_of=version_of, importable=importable)

    with_extension = plan_installation(torch_status, statuses, pytorch_utils_available=True, loaded_modules={},
                                       importable=importable)
    assert with_extension.torch_method == "ltt" and with_extension.install_ltt
    assert with_extension.pip_requirements == ["scipy>=1.7", "slicerio"]
    assert not with_extension.restart_needed
    assert "with light-the-torch, as the PyTorch extension installs it" in with_extension.describe()
    assert "light-the-torch>=0.5 is installed first" in with_extension.describe()
    ltt_there = plan_installation(torch_status, statuses, pytorch_utils_available=True, loaded_modules={},
                                  importable={"light_the_torch"}.__contains__)
    assert ltt_there.torch_method == "ltt" and not ltt_there.install_ltt

    without = plan_installation(torch_status, statuses, pytorch_utils_available=False, loaded_modules={})
    assert without.torch_method == "pip"


def test_upgrading_an_already_loaded_package_needs_a_restart():
    version_of, importable = environment({"scipy": "1.5.0", "torch": "2.1.0"}, {"scipy", "torch"})
    torch_status, statuses = check(["scipy>=1.7"], version_of=version_of, importable=importable)
    plan = plan_installation(torch_status, statuses, pytorch_utils_available=True, loaded_modules={"scipy": object()})
    assert plan.torch_method == "none"
    assert plan.restart_needed and "scipy 1.5.0 is already loaded" in plan.describe()


def test_nothing_to_do_when_everything_is_installed():
    version_of, importable = environment({"scipy": "1.11", "torch": "2.3"}, {"scipy", "torch"})
    torch_status, statuses = check(["scipy>=1.7"], version_of=version_of, importable=importable)
    plan = plan_installation(torch_status, statuses, pytorch_utils_available=False, loaded_modules={})
    assert plan.nothing_to_do and plan.describe() == "All required Python packages are installed."


def run_to_end(installation, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not installation.poll():
        assert time.monotonic() < deadline, installation.lastLine
        time.sleep(0.05)


@pytest.fixture
def offline_pip(monkeypatch):
    """Real pip in a child process, with no index: what is installed here is 'already satisfied', anything
    else fails, and nothing in this environment changes."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


def test_torch_comes_with_light_the_torch_in_the_child_as_the_pytorch_extension_installs_it():
    """PyTorchUtils' installTorch runs ``light_the_torch install torch<spec>`` (after installing
    light-the-torch) on Slicer's GUI thread, then imports torch there; the plan runs the same in the child."""
    pins = ["numpy==1.26.4", "SimpleITK==2.3.1"]
    plan = dependencies.InstallPlan("ltt", "torch>=2.0", ["scipy>=1.7"], pins=pins, install_ltt=True)
    steps = installation_steps(plan, "PythonSlicer")
    assert [step.command for step in steps] == [
        ["PythonSlicer", "-m", "pip", "install", "light-the-torch>=0.5", *pins],
        ["PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.0", *pins],
        ["PythonSlicer", "-m", "pip", "install", "scipy>=1.7", *pins],
    ]
    assert [step.tool for step in steps] == ["pip", "light-the-torch", "pip"]
    plan.install_ltt = False
    assert [step.requirement for step in installation_steps(plan, "PythonSlicer")] == ["torch>=2.0", "scipy>=1.7"]


def test_a_failing_light_the_torch_step_is_named_as_such(offline_pip):
    """Real child processes. light-the-torch is not installed here, so its step fails as it would if pip
    had not put it in place; the requirement and the tool are named, and nothing after it runs."""
    if dependencies.module_available("light_the_torch"):
        pytest.skip("light-the-torch is installed here: its step would succeed")
    plan = dependencies.InstallPlan("ltt", "torch>=2.0", ["packaging>=20"])
    log = []
    installation = start_install(plan, sys.executable, log.append)
    run_to_end(installation)
    assert installation.state == FAILED and installation.step == 1
    assert installation.error.startswith("light-the-torch could not install torch>=2.0 (exit code 1):")
    assert "No module named light_the_torch" in installation.error
    assert not any(str(line).startswith("pip: installing packaging") for line in log)


def test_torch_from_pip_comes_first_and_a_failure_names_the_package(offline_pip):
    plan = dependencies.InstallPlan("pip", "torch>=2.0", ["no-such-package-covidseg-test>=1"])
    installation = start_install(plan, sys.executable, lambda _line: None)
    run_to_end(installation)
    assert installation.state == FAILED and installation.step == 2  # torch (satisfied here), then the missing one
    assert "pip could not install no-such-package-covidseg-test>=1 (exit code 1)" in installation.error


def test_every_pip_call_pins_slicers_own_numpy_and_simpleitk():
    version_of, importable = environment({"numpy": "1.26.4", "SimpleITK": "2.3.1"}, {"numpy", "SimpleITK"})
    pins = pinned_versions(version_of)
    assert pins == ["numpy==1.26.4", "SimpleITK==2.3.1"]
    torch_status, statuses = check(["scipy>=1.7", "slicerio"], version_of=version_of, importable=importable)
    plan = plan_installation(torch_status, statuses, pytorch_utils_available=False, loaded_modules={}, pins=pins)
    steps = pip_steps("PythonSlicer", [plan.torch_requirement, *plan.pip_requirements], plan.pins)
    # A list: no shell-style splitting of specifiers like "scipy >= 1.7".
    assert [step.command for step in steps] == [["PythonSlicer", "-m", "pip", "install", requirement, *pins]
                                                 for requirement in ("torch>=2.0", "scipy>=1.7", "slicerio")]
    assert "Kept as they are (3D Slicer's own): numpy==1.26.4, SimpleITK==2.3.1" in plan.describe()


@pytest.mark.parametrize("slicer_version", sorted(SLICER_PYTHONS))
def test_requirements_never_ask_for_an_opencv_that_needs_numpy_2_on_python_3_9(slicer_version):
    """opencv-python-headless 4.12 and later require numpy>=2 on Python 3.9; Slicer 5.6/5.8 have numpy 1.26."""
    python, numpy_version = SLICER_PYTHONS[slicer_version]
    applicable = [r for r in read_requirements() if r.marker is None or r.marker.evaluate({"python_version": python})]
    opencv = [r for r in applicable if r.name == "opencv-python-headless"]
    assert len(opencv) == 1
    allows_numpy2_only_builds = opencv[0].specifier.contains(Version("4.12.0.88"))
    assert allows_numpy2_only_builds == (Version(numpy_version).major >= 2)
    assert opencv[0].specifier.contains(Version("4.11.0.86"))  # the last opencv for numpy 1.x on Python 3.9


def test_dependency_logic_reads_the_file_and_installs_with_the_interpreter_it_was_given(tmp_path, offline_pip):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("packaging>=20\nno-such-package-covidseg-test>=1\n")
    logic = DependencyLogic(interpreter=sys.executable, requirements_file=requirements)
    ready, lines = logic.status()
    assert not ready
    assert "no-such-package-covidseg-test: missing (need no-such-package-covidseg-test>=1)" in lines
    plan = logic.plan()
    assert plan.torch_method == "none"  # torch is installed here
    assert plan.pip_requirements == ["no-such-package-covidseg-test>=1"]
    assert plan.pins == pinned_versions()
    installation = logic.startInstall(plan, log=lambda _text: None)
    run_to_end(installation)
    assert installation.state == FAILED and installation.stepCount == 1
    assert "No matching distribution found for no-such-package-covidseg-test" in installation.error


def test_the_panel_opens_in_a_slicer_without_the_packages_it_installs():
    """The widget's setup imports the dependency and segmentation logic before it can offer to install
    anything, so that import chain must not need torch or any package of the requirements file (a fresh
    Slicer has none of them). Checked in a child Python where those imports fail."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    blocked = sorted({"torch"} | {import_name(requirement) for requirement in read_requirements()})
    child = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not in a fresh Slicer)")
sys.meta_path.insert(0, Block())
import CovidInfectionSegSlicer.dependencies, CovidInfectionSegSlicer.logic, CovidInfectionSegSlicer.pip_installation
print("imported")
"""
    module_folder = str(Path(dependencies.__file__).resolve().parents[1])  # where Slicer finds the module's packages
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([module_folder, os.environ.get("PYTHONPATH", "")])})
    assert "filelock" in blocked and "torch" in blocked
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "imported"
