"""The module uses only 3D Slicer API that every supported version has (5.6, 5.8, 5.10, main).

The scan of the module's code runs everywhere. The checks against Slicer's own source need a git
repository of Slicer/Slicer (``git clone --bare https://github.com/Slicer/Slicer``) named by the
environment variable ``SLICER_GIT_DIR``; without it they skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from CovidInfectionSegLib.segments import SEGMENTS, slicer_terminology, terminology_entry
from slicer_api import missing_in_source, used_api
from slicer_api_allowlist import ALLOWED, PY, SUPPORTED, slicer_checks

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CovidInfectionSeg"
MODULE_CODE = [MODULE_DIR / "CovidInfectionSeg.py", *sorted((MODULE_DIR / "CovidInfectionSegSlicer").glob("*.py")),
               MODULE_DIR / "Scripts" / "covidseg_slicer_batch.py"]
SLICER_GIT_DIR = os.environ.get("SLICER_GIT_DIR")
TERMINOLOGIES = "Modules/Loadable/Terminologies/Resources/"
PY_WRAPPER = PY + "parameterNodeWrapper/wrapper.py"


def slicer_ref(ref: str) -> str:
    if not SLICER_GIT_DIR:
        pytest.skip("set SLICER_GIT_DIR to a git repository of Slicer/Slicer to check against its source")
    found = subprocess.run(["git", f"--git-dir={SLICER_GIT_DIR}", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.skip(f"{SLICER_GIT_DIR} has no {ref}; fetch it")
    return ref


def slicer_file(ref: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={SLICER_GIT_DIR}", "show", f"{ref}:{path}"],
                          capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------------------- the module's code


def test_module_code_uses_only_allow_listed_slicer_api():
    uses = used_api(MODULE_CODE, REPO)
    unknown = {name: sorted(places) for name, places in uses.items() if name not in ALLOWED}
    assert unknown == {}, "Slicer API not in Testing/slicer_api_allowlist.py: check it in each supported version's source"


def test_allow_list_names_nothing_the_module_no_longer_uses():
    assert set(ALLOWED) - set(used_api(MODULE_CODE, REPO)) == set()


def test_the_scan_sees_calls_on_objects_and_chains(tmp_path):
    """What the scan must catch: the 5.10-only SetTerminology on a segment made anywhere, a slicer.util function."""
    sample = tmp_path / "sample.py"
    sample.write_text("import slicer\nfrom slicer.util import pip_install\nimport SimpleITK as sitk\n\n"
                      "def f(segment, image):\n    segment.SetTerminology('x')\n    slicer.util.arrayFromVolume(image)\n"
                      "    sitk.ReadImage('a.nrrd')\n    pip_install('x')\n")
    uses = used_api([sample], tmp_path)
    assert {"*.SetTerminology", "slicer.util.arrayFromVolume", "slicer.util.pip_install", "slicer"} <= set(uses)
    assert "*.ReadImage" not in uses  # SimpleITK's module function, not Slicer's
    assert "*.SetTerminology" not in ALLOWED


# ------------------------------------------------------------------- against each version's source


@pytest.mark.parametrize("version", sorted(SUPPORTED))
def test_every_allow_listed_name_exists_in_this_slicer_version(version):
    ref = slicer_ref(SUPPORTED[version])
    assert missing_in_source(SLICER_GIT_DIR, ref, slicer_checks()) == []


def test_the_source_check_catches_api_a_version_lacks():
    ref = slicer_ref(SUPPORTED["5.6.2"])
    segment_header = "Libs/vtkSegmentationCore/vtkSegment.h"
    assert missing_in_source(SLICER_GIT_DIR, ref, [(segment_header, "SetTerminology")]) == [f"{segment_header}: SetTerminology"]
    assert missing_in_source(SLICER_GIT_DIR, slicer_ref(SUPPORTED["5.10.0"]), [(segment_header, "SetTerminology")]) == []


def _function_source(text: str, name: str) -> str:
    import ast

    return ast.unparse(next(node for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef) and node.name == name))


@pytest.mark.parametrize("version", sorted(SUPPORTED))
def test_messages_translate_in_the_context_of_the_file_that_wrote_them(version, tmp_path):
    """Slicer's own slicer.i18n (from its source) in a child process with an application that records
    what it is asked: CovidInfectionSegSlicer's _() must be that tr itself, not a wrapper (a wrapper
    would make every text's context "CovidInfectionSegSlicer.i18n", where no translation is looked for)."""
    i18n = tmp_path / "i18n.py"
    i18n.write_text(slicer_file(slicer_ref(SUPPORTED[version]), PY + "i18n.py"), encoding="utf-8")
    child = f"""
import importlib.util, json, sys
import slicer
asked = []
class Application:
    def translate(self, context, text):
        asked.append(context)
        return "<" + text + ">"
slicer.app = Application()
spec = importlib.util.spec_from_file_location("slicer.i18n", {str(i18n)!r})
slicer.i18n = sys.modules["slicer.i18n"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(slicer.i18n)
from CovidInfectionSegSlicer.volumes import nodeLabel
print(json.dumps([nodeLabel(None), asked]))
"""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["<input volume>", ["CovidInfectionSegSlicer.volumes"]]


@pytest.mark.parametrize("version", sorted(SUPPORTED))
def test_connect_parameters_to_gui_returns_the_tag_that_disconnect_gui_takes(version):
    """The widget keeps connectParametersToGui's tag to undo the connection on exit and scene close."""
    wrapper = slicer_file(slicer_ref(SUPPORTED[version]), PY_WRAPPER)
    assert 'checkedSetAttr(classtype, "connectParametersToGui", _connectParametersToGui)' in wrapper
    assert _function_source(wrapper, "_connectParametersToGui").rstrip().endswith("return tag")
    assert "del self._parameterGUIs[guiTag]" in _function_source(wrapper, "_disconnectGui")


def test_connect_gui_returns_no_tag_before_slicer_5_10():
    """Why the widget does not use connectGui (the template's way): 5.6 and 5.8 drop its tag."""
    for version in ("5.6.1", "5.8.1"):
        connect = _function_source(slicer_file(slicer_ref(SUPPORTED[version]), PY_WRAPPER), "_connectGui")
        assert "return" not in connect, version
    connect = _function_source(slicer_file(slicer_ref(SUPPORTED["5.10.0"]), PY_WRAPPER), "_connectGui")
    assert "return _connectParametersToGui(self, paramNameToWidget)" in connect


@pytest.mark.parametrize("version", sorted(SUPPORTED))
def test_segment_terminology_resolves_in_the_lists_this_slicer_loads(version):
    """Each code is in the context the entry names, among the lists Slicer loads at startup."""
    ref = slicer_ref(SUPPORTED[version])
    logic = slicer_file(ref, "Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.cxx")
    categories: dict[str, list] = {}
    regions: dict[str, list] = {}
    for name in ("SegmentationCategoryTypeModifier-SlicerGeneralAnatomy", "SegmentationCategoryTypeModifier-DICOM-Master",
                 "AnatomicRegionAndModifier-DICOM-Master"):
        assert f"/{name}.term.json" in logic, f"{version} does not load {name} by default"
        data = json.loads(slicer_file(ref, f"{TERMINOLOGIES}{name}.json"))
        if "SegmentationCodes" in data:
            categories[data["SegmentationCategoryTypeContextName"]] = data["SegmentationCodes"]["Category"]
        else:
            regions[data["AnatomicContextName"]] = data["AnatomicCodes"]["AnatomicRegion"]

    def find(items: list, code: list) -> dict:
        scheme, value, meaning = code
        found = [item for item in items if (item["CodingSchemeDesignator"], item["CodeValue"]) == (scheme, value)]
        assert found, f"{code} not in the list"
        assert found[0]["CodeMeaning"] == meaning
        return found[0]

    for segment in SEGMENTS:
        entry = slicer_terminology(segment["terminology"])
        category = find(categories[entry["contextName"]], entry["category"])
        segment_type = find(category["Type"], entry["type"])
        if "typeModifier" in entry:
            find(segment_type["Modifier"], entry["typeModifier"])
        if "anatomicRegion" in entry:
            assert category.get("showAnatomy", True) in (True, "true"), "Slicer shows no region for this category"
            find(regions[entry["anatomicContextName"]], entry["anatomicRegion"])


def test_serialized_entry_is_what_slicerio_writes_for_the_same_terminology():
    slicerio = pytest.importorskip("slicerio.segmentation")
    for segment in SEGMENTS:
        assert terminology_entry(segment["terminology"]) == slicerio.terminology_entry_to_string(
            slicer_terminology(segment["terminology"]))
