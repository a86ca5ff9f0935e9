"""What the module installs inside Slicer: the pure decision logic of CovidInfectionSegLib.dependencies."""

from __future__ import annotations

import pytest

from CovidInfectionSegLib import dependencies
from CovidInfectionSegLib.dependencies import check, install, package_status, plan_installation, read_requirements


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


def test_plan_uses_the_pytorch_extension_when_present_and_pip_otherwise():
    version_of, importable = environment({"scipy": "1.5.0"}, {"scipy"})
    torch_status, statuses = check(["scipy>=1.7", "slicerio"], version_of=version_of, importable=importable)

    with_extension = plan_installation(torch_status, statuses, pytorch_utils_available=True, loaded_modules={})
    assert with_extension.torch_method == "pytorchutils"
    assert with_extension.pip_requirements == ["scipy>=1.7", "slicerio"]
    assert not with_extension.restart_needed
    assert "PyTorch extension" in with_extension.describe()

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


def test_install_runs_the_plan_in_order_and_reports_failures():
    plan = dependencies.InstallPlan("pytorchutils", "torch>=2.0", ["scipy>=1.7", "slicerio"])
    calls = []
    install(plan, pip_install=calls.append, install_torch_with_pytorchutils=lambda spec: calls.append(("torch", spec)) or "torch",
            log=lambda _text: None)
    assert calls == [("torch", ">=2.0"), ["scipy>=1.7"], ["slicerio"]]

    declined = dependencies.InstallPlan("pytorchutils", "torch>=2.0")
    with pytest.raises(RuntimeError, match="was not installed"):
        install(declined, pip_install=calls.append, install_torch_with_pytorchutils=lambda spec: None, log=lambda _t: None)

    def offline_pip(args):
        raise OSError("network is unreachable")

    with pytest.raises(RuntimeError, match="pip could not install slicerio: network is unreachable"):
        install(dependencies.InstallPlan("none", "torch>=2.0", ["slicerio"]), pip_install=offline_pip, log=lambda _t: None)
