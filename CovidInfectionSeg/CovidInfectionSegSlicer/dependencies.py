"""What Python packages the module still needs inside 3D Slicer, and how to install them.

Plain Python (no Slicer, no Qt, no torch import): the module panel uses a :class:`DependencyLogic`:
:meth:`~DependencyLogic.status`, then :meth:`~DependencyLogic.plan` whose :meth:`InstallPlan.describe`
the user confirms, then :meth:`~DependencyLogic.startInstall`, which runs pip in a child process that
the panel polls (:mod:`.pip_installation`). Nothing is installed at import time.

torch is special. When the PyTorch extension (PyTorchUtils) is installed, torch comes the way that
extension installs it, with ``light-the-torch``, which picks the build that matches the GPU driver
(CUDA or CPU); but in our child process, not through ``PyTorchUtilsLogic().installTorch``, which blocks
Slicer for the whole download and then imports torch into Slicer's process. Otherwise torch comes from
PyPI with ``pip``, which on Windows and macOS is a CPU-only build.

Slicer's own numpy (1.26 in Slicer 5.6 and 5.8, Python 3.9; 2.x from 5.10) must not change under the
running application: every pip call pins the installed numpy and SimpleITK (:data:`PINNED_DISTRIBUTIONS`),
so pip picks versions of the other packages that work with them, or fails with a message, instead
of upgrading them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from .i18n import tr as _
from .pip_installation import InstallationProtocol, PipInstallation, PipStep, pip_steps

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
# The bundled TorchScript model needs a torch that reads its serialization format.
TORCH_REQUIREMENT = "torch>=2.0"
# What the PyTorch extension installs torch with (PyTorchUtils._installLightTheTorch asks for the same).
LTT_REQUIREMENT = "light-the-torch>=0.5"
LTT_MODULE = "light_the_torch"
# Packages that 3D Slicer ships and that other packages must not upgrade: pinned in every pip call.
PINNED_DISTRIBUTIONS = ("numpy", "SimpleITK")
# Distribution name -> the module it provides, where they differ.
IMPORT_NAMES = {
    "opencv-python-headless": "cv2",
    "opencv-python": "cv2",
    "scikit-image": "skimage",
    "simpleitk": "SimpleITK",
    "pyyaml": "yaml",
}
# Distributions that provide the same import (any one of them will do).
EQUIVALENT_DISTRIBUTIONS = {
    "cv2": ("opencv-python-headless", "opencv-python", "opencv-contrib-python", "opencv-contrib-python-headless"),
}

VersionLookup = Callable[[str], Optional[str]]
ModuleLookup = Callable[[str], bool]


def import_name(requirement: Requirement) -> str:
    """The module a requirement provides (``opencv-python-headless`` -> ``cv2``)."""
    name = requirement.name.lower()
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def installed_version(distribution: str) -> str | None:
    """Version of an installed distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it). Looks afresh: pip, in a child
    process, may have just installed it into a folder whose listing this process has cached."""
    importlib.invalidate_caches()
    return importlib.util.find_spec(module) is not None


@dataclass(frozen=True)
class PackageStatus:
    """One requirement and what is installed for it."""

    requirement: Requirement
    module: str
    version: str | None  # installed version of a distribution providing the module, or None
    importable: bool

    @property
    def satisfied(self) -> bool:
        if not self.importable:
            return False
        if self.version is None or not self.requirement.specifier:
            return True  # importable, version unknown or unconstrained
        try:
            return self.requirement.specifier.contains(Version(self.version), prereleases=True)
        except InvalidVersion:
            return True

    def describe(self) -> str:
        if self.satisfied:
            return _("{name} {version} ok").format(name=self.requirement.name, version=self.version or "").replace("  ", " ")
        if not self.importable:
            return _("{name}: missing (need {requirement})").format(name=self.requirement.name, requirement=self.requirement)
        return _("{name}: version {version} installed, need {requirement}").format(
            name=self.requirement.name, version=self.version, requirement=self.requirement)


def read_requirements(path: str | Path = REQUIREMENTS_FILE) -> list[Requirement]:
    """Requirements from a pip requirements file (comments and blank lines ignored).

    Raises ValueError naming the file and line for a line pip would not understand.
    """
    path = Path(path)
    requirements = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirements.append(Requirement(text))
        except InvalidRequirement as error:
            raise ValueError(_("{path}:{line}: not a valid requirement {text!r}: {error}").format(
                path=path, line=number, text=text, error=error)) from error
    return requirements


def package_status(
    requirement: Requirement | str,
    version_of: VersionLookup = installed_version,
    importable: ModuleLookup = module_available,
) -> PackageStatus:
    """What is installed for ``requirement``; ``version_of``/``importable`` are replaceable for tests."""
    requirement = requirement if isinstance(requirement, Requirement) else Requirement(requirement)
    module = import_name(requirement)
    candidates = EQUIVALENT_DISTRIBUTIONS.get(module, (requirement.name,))
    version = next((v for v in (version_of(name) for name in candidates) if v is not None), None)
    return PackageStatus(requirement, module, version, importable(module))


def check(
    requirements: Iterable[Requirement | str] | None = None,
    torch_requirement: str = TORCH_REQUIREMENT,
    version_of: VersionLookup = installed_version,
    importable: ModuleLookup = module_available,
) -> tuple[PackageStatus, list[PackageStatus]]:
    """(torch status, status of every other requirement); requirements default to the module's file.

    Requirements whose environment marker does not apply (e.g. ``; sys_platform == 'win32'``) are left out.
    """
    if requirements is None:
        requirements = read_requirements()
    statuses = []
    for requirement in requirements:
        requirement = requirement if isinstance(requirement, Requirement) else Requirement(requirement)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        statuses.append(package_status(requirement, version_of, importable))
    return package_status(torch_requirement, version_of, importable), statuses


@dataclass
class InstallPlan:
    """What to install, how, and whether Slicer must restart afterwards."""

    torch_method: str  # "none" (already fine), "ltt" (light-the-torch, as the PyTorch extension) or "pip"
    torch_requirement: str
    pip_requirements: list[str] = field(default_factory=list)
    restart_reasons: list[str] = field(default_factory=list)
    pins: list[str] = field(default_factory=list)  # e.g. "numpy==1.26.4": kept as they are
    install_ltt: bool = False  # light-the-torch itself is installed first, with pip

    @property
    def nothing_to_do(self) -> bool:
        return self.torch_method == "none" and not self.pip_requirements

    @property
    def restart_needed(self) -> bool:
        return bool(self.restart_reasons)

    def describe(self) -> str:
        """Plain-text explanation for the confirmation dialog and the panel."""
        if self.nothing_to_do:
            return _("All required Python packages are installed.")
        lines = [_("CovidInfectionSeg needs these Python packages installed into 3D Slicer's Python:")]
        if self.torch_method == "ltt":
            first = _("; {ltt} is installed first").format(ltt=LTT_REQUIREMENT) if self.install_ltt else ""
            lines.append(_("- {torch} with light-the-torch, as the PyTorch extension installs it (it picks the CUDA or "
                           "CPU build that matches this computer)").format(torch=self.torch_requirement) + first)
        elif self.torch_method == "pip":
            lines.append(_("- {torch} from PyPI with pip (the PyTorch extension is not installed; install it from the "
                           "Extensions Manager to get a GPU build matched to your driver)").format(torch=self.torch_requirement))
        lines.extend(f"- {requirement}" for requirement in self.pip_requirements)
        if self.pins:
            lines.append(_("Kept as they are (3D Slicer's own): ") + ", ".join(self.pins))
        lines.append(_("This downloads from the internet and can take several minutes (torch is about 1-3 GB)."))
        if self.restart_needed:
            lines.append(_("Slicer must be restarted afterwards: ") + "; ".join(self.restart_reasons))
        return "\n".join(lines)


def pinned_versions(version_of: VersionLookup = installed_version) -> list[str]:
    """``name==version`` of each installed :data:`PINNED_DISTRIBUTIONS` package."""
    pins = []
    for name in PINNED_DISTRIBUTIONS:
        version = version_of(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins


def plan_installation(
    torch_status: PackageStatus,
    statuses: Sequence[PackageStatus],
    pytorch_utils_available: bool,
    loaded_modules: Mapping[str, object] | None = None,
    pins: Sequence[str] = (),
    importable: ModuleLookup = module_available,
) -> InstallPlan:
    """Decide what to install. ``loaded_modules`` (default ``sys.modules``) tells which packages are
    already imported in this process: upgrading one of those only takes effect after a restart.
    ``pins`` (see :func:`pinned_versions`) go into every pip call; ``importable`` says whether
    light-the-torch is there already."""
    loaded = sys.modules if loaded_modules is None else loaded_modules
    if torch_status.satisfied:
        torch_method = "none"
    else:
        torch_method = "ltt" if pytorch_utils_available else "pip"
    plan = InstallPlan(torch_method, str(torch_status.requirement), pins=list(pins),
                       install_ltt=torch_method == "ltt" and not importable(LTT_MODULE))
    for status in statuses:
        if status.satisfied:
            continue
        plan.pip_requirements.append(str(status.requirement))
        if status.module in loaded:
            plan.restart_reasons.append(_("{module} {version} is already loaded and gets replaced").format(
                module=status.module, version=status.version))
    if torch_method != "none" and "torch" in loaded:
        plan.restart_reasons.append(_("{module} {version} is already loaded and gets replaced").format(
            module="torch", version=torch_status.version))
    return plan


def installation_steps(plan: InstallPlan, interpreter: str) -> list[PipStep]:
    """The child processes that carry out ``plan``, in order: light-the-torch when it is missing, torch,
    then the other requirements; each with the pins."""
    steps = pip_steps(interpreter, [LTT_REQUIREMENT], plan.pins) if plan.install_ltt else []
    if plan.torch_method == "ltt":
        steps.append(PipStep(plan.torch_requirement, [str(interpreter), "-m", LTT_MODULE, "install",
                                                      plan.torch_requirement, *plan.pins], tool="light-the-torch"))
    elif plan.torch_method == "pip":
        steps += pip_steps(interpreter, [plan.torch_requirement], plan.pins)
    return steps + pip_steps(interpreter, plan.pip_requirements, plan.pins)


def start_install(plan: InstallPlan, interpreter: str, log: Callable[[str], None] = print) -> PipInstallation:
    """Start carrying out ``plan`` with ``interpreter`` (Slicer's ``PythonSlicer``): its
    :func:`installation_steps` one after the other in a child process (:mod:`.pip_installation`)."""
    return PipInstallation(installation_steps(plan, interpreter), log)


# ------------------------------------------------------------------------------- for the widget


class DependencyLogicProtocol(Protocol):
    """What the widget needs to show and install the Python packages."""

    def status(self) -> tuple[bool, list[str]]: ...

    def plan(self) -> InstallPlan: ...

    def startInstall(self, plan: InstallPlan, log: Callable[[str], None]) -> InstallationProtocol: ...


class DependencyLogic:
    """:func:`check`, :func:`plan_installation` and :func:`start_install` for the module's requirements file."""

    def __init__(
        self,
        pytorch_utils_available: bool = False,
        interpreter: str | None = None,
        requirements_file: str | Path = REQUIREMENTS_FILE,
    ):
        """``pytorch_utils_available``: the PyTorch extension is installed (torch then comes with
        light-the-torch); ``interpreter``: the Python whose pip installs (default: Slicer's ``PythonSlicer``)."""
        self._pytorch_utils_available = pytorch_utils_available
        self._interpreter = interpreter
        self._requirements_file = Path(requirements_file)

    def status(self) -> tuple[bool, list[str]]:
        """(everything needed is installed, one line per package). Raises OSError/ValueError for a bad file."""
        torch_status, statuses = check(read_requirements(self._requirements_file))
        everything = [torch_status, *statuses]
        return all(status.satisfied for status in everything), [status.describe() for status in everything]

    def plan(self) -> InstallPlan:
        torch_status, statuses = check(read_requirements(self._requirements_file))
        return plan_installation(torch_status, statuses, self._pytorch_utils_available, pins=pinned_versions())

    def startInstall(self, plan: InstallPlan, log: Callable[[str], None] = print) -> PipInstallation:
        interpreter = self._interpreter
        if interpreter is None:
            from .engine_process import findPythonSlicer

            interpreter = findPythonSlicer()
        return start_install(plan, interpreter, log)
