"""The Slicer extension's files agree with each other: CMake lists, the .ui panel, the module's Python."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import pytest

from CovidInfectionSegSlicer.dependencies import import_name, read_requirements
from slicer_api_allowlist import SUPPORTED

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CovidInfectionSeg"
MODULE_FILE = MODULE_DIR / "CovidInfectionSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CovidInfectionSeg.ui"
LIB_DIR = MODULE_DIR / "CovidInfectionSegLib"
SLICER_DIR = MODULE_DIR / "CovidInfectionSegSlicer"
BATCH_SCRIPT = MODULE_DIR / "Scripts" / "covidseg_slicer_batch.py"
# The code that runs inside Slicer's own Python: the module, its Slicer-side package, the batch script.
SLICER_SIDE = [MODULE_FILE, *sorted(SLICER_DIR.glob("*.py")), BATCH_SCRIPT]
# Arrive with the trained model (the lead adds them); everything else CMake lists must exist now.
MODEL_FILES = {"Resources/Models/covid_unet_v2.pt", "Resources/Models/covid_unet_v2.json", "Resources/Models/MODEL_CARD.md"}
# Third-party modules that 3D Slicer itself provides (torch is checked by dependencies.TORCH_REQUIREMENT).
PROVIDED_BY_SLICER = {"numpy", "SimpleITK", "vtk", "slicer", "qt", "ctk", "packaging", "torch"}
# Optional extras of the engine that nothing inside Slicer uses, imported only where they are needed:
# ray for `covidseg batch --ray` (cluster.py; extra 'distributed').
OPTIONAL_OUTSIDE_SLICER = {"ray"}


def cmake_list(variable: str) -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in CovidInfectionSeg/CMakeLists.txt"
    return [item.replace("${MODULE_NAME}", "CovidInfectionSeg") for item in match.group(1).split()]


def ui_widgets() -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in ET.parse(UI_FILE).getroot().iter("widget")}


def ui_property(widget: ET.Element, name: str) -> ET.Element | None:
    return next((prop for prop in widget.findall("property") if prop.get("name") == name), None)


# ------------------------------------------------------------------------------------------- CMake


def test_top_level_cmake_has_extension_metadata_and_builds_the_module():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({variable} "[^"]+"\)', text), f"{variable} missing or empty"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert "find_package(Slicer REQUIRED)" in text
    assert "add_subdirectory(CovidInfectionSeg)" in text
    assert "include(${Slicer_EXTENSION_CPACK})" in text


def test_extension_icon_and_screenshots_are_files_in_this_repository():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = {variable: re.search(rf'set\({variable} "([^"]+)"\)', text).group(1).split()
            for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")}
    for variable, values in urls.items():
        for url in values:
            path = url.split("/main/", 1)[1]  # the host part is a placeholder until the project is published
            assert path.startswith("Resources/"), f"{variable}: {path} is not in the top-level Resources/"
            assert (REPO / path).is_file(), f"{variable} names {path}, which does not exist"
    icon = cv2.imread(str(REPO / urls["EXTENSION_ICONURL"][0].split("/main/", 1)[1]), cv2.IMREAD_UNCHANGED)
    assert icon is not None and icon.shape == (128, 128, 4)
    for url in urls["EXTENSION_SCREENSHOTURLS"]:
        name = url.rsplit("/", 1)[1]
        caption = (REPO / "Resources" / "Screenshots" / "README.md").read_text(encoding="utf-8")
        assert f"`{name}`" in caption and "CC BY 4.0" in caption and "doi:" in caption, "caption and scan credit"


def test_module_cmake_builds_a_scripted_module_with_generic_tests():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert (MODULE_DIR / "Testing" / "CMakeLists.txt").is_file()


@pytest.mark.parametrize("listed", cmake_list("MODULE_PYTHON_SCRIPTS") + cmake_list("MODULE_PYTHON_RESOURCES"))
def test_every_file_cmake_lists_exists(listed):
    if listed in MODEL_FILES and not (MODULE_DIR / listed).exists():
        pytest.skip(f"{listed}: the bundled model is added with the trained model package")
    assert (MODULE_DIR / listed).is_file(), f"CMakeLists.txt lists {listed}, which does not exist"


def test_every_script_and_resource_of_the_module_is_listed():
    listed = set(cmake_list("MODULE_PYTHON_SCRIPTS")) | set(cmake_list("MODULE_PYTHON_RESOURCES"))
    present = {
        path.relative_to(MODULE_DIR).as_posix()
        for path in MODULE_DIR.rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and path.parts[len(MODULE_DIR.parts)] != "Testing"
        and path.name != "CMakeLists.txt"
    }
    assert present - listed == set(), "files in the module folder that CMakeLists.txt does not install"


# -------------------------------------------------------------------------------------------- panel


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no widget of its .ui file?"
    assert used - set(ui_widgets()) == set()


def _widget_method(name: str) -> ast.FunctionDef:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    widget = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CovidInfectionSegWidget")
    return next(node for node in widget.body if isinstance(node, ast.FunctionDef) and node.name == name)


def test_parameter_node_fields_are_connected_to_ui_widgets_with_a_tag_every_version_returns():
    """connectParametersToGui with the widgets named, not connectGui: before Slicer 5.10 connectGui returns
    no tag (test_slicer_api checks both in Slicer's source), so disconnectGui could not undo it and each
    re-entry's stale connector reset the remembered device to Auto."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    wrapper = next(
        node for node in tree.body
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
    )
    fields = {statement.target.id for statement in wrapper.body if isinstance(statement, ast.AnnAssign)}
    assert fields == {"inputVolume", "outputSegmentation", "device", "flipTTA", "noduleCheck"}
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]
    assert not [call for call in calls if call.func.attr == "connectGui"]
    (connect,) = [call for call in calls if call.func.attr == "connectParametersToGui"]
    mapping = {key.value: value.attr for key, value in zip(connect.args[0].keys, connect.args[0].values)}
    widgets = ui_widgets()
    assert {field: widgets[name].get("class") for field, name in mapping.items()} == {
        "inputVolume": "qMRMLNodeComboBox", "outputSegmentation": "qMRMLNodeComboBox", "device": "QComboBox",
        "flipTTA": "QCheckBox", "noduleCheck": "QCheckBox"}
    assert not [name for name, widget in widgets.items() if ui_property(widget, "SlicerParameterName") is not None], \
        "a SlicerParameterName in the .ui would be a second, unused binding"


def test_widget_sets_up_its_attributes_before_the_base_constructor_can_call_setup():
    """Without a parent, ScriptedLoadableModuleWidget.__init__ calls setup() itself (a widget made from the
    Python console or a test with injected logic objects)."""
    body = _widget_method("__init__").body
    last = body[-1]
    assert isinstance(last, ast.Expr) and ast.unparse(last.value) == "ScriptedLoadableModuleWidget.__init__(self, parent)"
    assigned = {target.attr for statement in body if isinstance(statement, (ast.Assign, ast.AnnAssign))
                for target in (statement.targets if isinstance(statement, ast.Assign) else [statement.target])
                if isinstance(target, ast.Attribute)}
    used_in_setup = {node.attr for node in ast.walk(_widget_method("setup"))
                     if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"}
    assert {"segmentationLogic", "dependencyLogic", "_timer"} <= assigned & used_in_setup


def test_closing_the_scene_forgets_the_shown_result():
    source = ast.unparse(_widget_method("onSceneStartClose"))
    assert "self._clearResult()" in source
    cleared = ast.unparse(_widget_method("_clearResult"))
    for statement in ("self._lastSegmentation = None", "self.ui.resultsTableView.setMRMLTableNode(None)",
                      "self.ui.statusLabel.text = ''", "self.ui.warningsLabel.text = ''"):
        assert statement in cleared


def test_ui_node_selectors_take_the_right_node_types():
    widgets = ui_widgets()
    assert ET.parse(UI_FILE).getroot().find("widget").get("class") == "qMRMLWidget"

    def node_types(name: str) -> list[str]:
        return [s.text for s in ui_property(widgets[name], "nodeTypes").iter("string")]

    assert node_types("inputVolumeSelector") == ["vtkMRMLScalarVolumeNode"]
    assert node_types("outputSegmentationSelector") == ["vtkMRMLSegmentationNode"]
    assert ui_property(widgets["outputSegmentationSelector"], "noneEnabled").find("bool").text == "true"
    assert "new" in ui_property(widgets["outputSegmentationSelector"], "noneDisplay").find("string").text.lower()
    receivers = {c.find("receiver").text for c in ET.parse(UI_FILE).getroot().iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert receivers == {"inputVolumeSelector", "outputSegmentationSelector"}


def test_icon_is_a_128_pixel_png_with_transparency():
    icon = cv2.imread(str(MODULE_DIR / "Resources" / "Icons" / "CovidInfectionSeg.png"), cv2.IMREAD_UNCHANGED)
    assert icon is not None and icon.shape == (128, 128, 4)
    alpha = icon[..., 3]
    assert 0.2 < (alpha > 0).mean() < 0.9  # a shape on a transparent background, not a filled square


# ------------------------------------------------------------------------------- Python boundaries


def top_level_imports(path: Path) -> set[str]:
    """Modules imported at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_loading_the_module_imports_neither_torch_nor_its_packages():
    imports = top_level_imports(MODULE_FILE)
    assert not {name for name in imports if name.split(".")[0] == "torch"}
    assert not {name for name in imports if name.split(".")[0] in {"CovidInfectionSegLib", "CovidInfectionSegSlicer"}}


def test_the_self_test_skips_in_setUp_which_ctest_runs_before_each_test_method():
    """ctest runs the self-test through slicer.testing.runUnitTest: unittest's loader runs each test_ method
    after setUp and never calls runTest, so a skip for missing packages must sit in setUp (Reload and Test
    calls runTest, which calls setUp before each test)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    test_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "CovidInfectionSegTest")
    methods = {node.name: node for node in test_class.body if isinstance(node, ast.FunctionDef)}

    def called(method: str) -> list[str]:
        return [node.func.attr for node in ast.walk(methods[method])
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)]

    assert "skipTest" in called("setUp")
    tests = sorted(name for name in methods if name.startswith("test_"))
    assert tests and called("runTest").count("setUp") == len(tests), "runTest calls setUp before each test"


def test_slicer_side_uses_no_application_or_qt_outside_the_module_file():
    """The Slicer-side package runs under slicer-core: no slicer.app, slicer.modules, slicer.mrmlScene, Qt."""
    for path in sorted(SLICER_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        application_calls = [
            f"slicer.{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer"
            and node.attr in {"app", "modules", "mrmlScene"}
        ]
        assert application_calls == [], path.name
        assert not {"qt", "ctk"} & {name.split(".")[0] for name in all_imports(path)}, path.name


def test_engine_package_has_no_slicer_code():
    """What `pip install -e .` ships imports neither Slicer, Qt, CTK nor VTK, anywhere in a file."""
    for path in sorted(LIB_DIR.glob("*.py")):
        imported = {name.split(".")[0] for name in all_imports(path)}
        assert not imported & {"slicer", "qt", "ctk", "vtk", "CovidInfectionSegSlicer"}, path.name


def test_no_python_threads_in_the_slicer_side():
    """Slicer's main thread holds the GIL while Qt idles: background work runs in a child process instead."""
    for path in SLICER_SIDE:
        assert not {"threading", "_thread", "concurrent"} & {name.split(".")[0] for name in all_imports(path)}, path.name


@pytest.mark.parametrize("path", [*SLICER_SIDE, *sorted(LIB_DIR.glob("*.py"))], ids=lambda path: path.name)
def test_code_that_runs_in_slicer_parses_as_python_3_9(path):
    """Slicer 5.6 and 5.8 run Python 3.9 (the engine runs there too, in PythonSlicer)."""
    ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def test_user_facing_text_goes_through_translation():
    """Texts shown in the panel (module texts, labels, dialogs) are wrapped in _() (slicer.i18n.tr)."""
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    untranslated = []
    for node in ast.walk(tree):
        shown = []
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and node.targets[0].attr in {
                "text", "title", "helpText", "acknowledgementText"}:
            shown.append(node.value)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {
                "errorDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "tryWithErrorDisplay"}:
            shown.extend(node.args[:2])
        for value in shown:
            if isinstance(value, (ast.Constant, ast.JoinedStr)) and not (isinstance(value, ast.Constant) and value.value == ""):
                untranslated.append(f"line {node.lineno}")
    assert untranslated == []


def test_slicer_side_messages_go_through_translation():
    """What the Slicer-side package raises or reports is a constant text in _(), filled in by .format():
    lupdate extracts constants, and an f-string would be translated after it was filled in (never found)."""
    untranslated = []
    for path in sorted(SLICER_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            messages = []
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                messages = node.exc.args[:1]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in {"_finish", "_log"}:
                messages = node.args[-1:] if node.func.attr == "_log" else node.args[1:2]
            for message in messages:
                texts = [part for part in ast.walk(message) if isinstance(part, (ast.Constant, ast.JoinedStr))]
                inside = {id(part) for call in ast.walk(message) if isinstance(call, ast.Call)
                          and isinstance(call.func, ast.Name) and call.func.id == "_" for part in ast.walk(call)}
                words = [part for part in texts if any(character.isalpha() for character in literal_text(part))
                         and (isinstance(part, ast.JoinedStr) or " " in literal_text(part))]  # not a key like "message"
                if any(id(part) not in inside for part in words):
                    untranslated.append(f"{path.name}:{node.lineno}")
    assert untranslated == []


def test_translation_falls_back_to_the_text_without_the_application():
    from CovidInfectionSegSlicer.i18n import tr
    from CovidInfectionSegSlicer.volumes import nodeLabel

    assert tr("{name}: the volume has no voxels").format(name="CT") == "CT: the volume has no voxels"
    assert nodeLabel(None) == "input volume"


def test_readme_and_docs_say_where_the_module_is_and_which_versions_it_supports():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    title = next(node.value.args[0].value for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) and node.targets[0].attr == "title")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    guide = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    for text in (readme, guide):
        assert f"*Segmentation > {title}*" in text
        assert "Slicer 5.4+" not in text
    for version, ref in SUPPORTED.items():  # the versions checked, and the commit of main
        assert (ref[:12] if version == "main" else version) in guide


def literal_text(node: ast.Constant | ast.JoinedStr) -> str:
    """The text written in a string literal or f-string, without what its fields fill in."""
    parts = node.values if isinstance(node, ast.JoinedStr) else [node]
    return "".join(part.value for part in parts if isinstance(part, ast.Constant) and isinstance(part.value, str))


def all_imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    modules = set()
    for path in [*LIB_DIR.glob("*.py"), *SLICER_SIDE]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    ours = {"CovidInfectionSegLib", "CovidInfectionSegSlicer", "SampleData", "PyTorchUtils"}
    return {m for m in modules if m not in stdlib and m not in ours}


def test_requirements_file_covers_every_third_party_import():
    provided = {import_name(requirement) for requirement in read_requirements()}
    provided |= PROVIDED_BY_SLICER | OPTIONAL_OUTSIDE_SLICER
    assert third_party_imports() - provided == set(), "add these to CovidInfectionSeg/Resources/requirements.txt"
