"""The engine in a child process, launched as the module launches it, with a real MRML scene (slicer-core).

The module passes ``PythonSlicer``; these tests pass ``sys.executable``. Everything is real: the child
processes, the small TorchScript models, the phantoms, the MRML scene.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML in plain Python) is not installed")
vtk = pytest.importorskip("vtk")

from model_factory import HalfBlindNet, write_model_package  # noqa: E402
from phantoms import chest_phantom, lung_and_infection_net  # noqa: E402
from test_slicer_logic import labelmap_of  # noqa: E402

from CovidInfectionSegLib import worker  # noqa: E402
from CovidInfectionSegLib.model_package import load_model_package  # noqa: E402
from CovidInfectionSegLib.pipeline import segment_image  # noqa: E402
from CovidInfectionSegLib.segments import SEGMENTS, terminology_entry  # noqa: E402
from CovidInfectionSegSlicer.engine_process import EngineProcess  # noqa: E402
from CovidInfectionSegSlicer.logic import CANCELLED, FAILED, SUCCEEDED, EngineError, SegmentationLogic  # noqa: E402
from CovidInfectionSegSlicer.results import measurementsFromTable  # noqa: E402
from CovidInfectionSegSlicer.volumes import imageToVolumeNode, ijkToRasArray  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORIGIN = (-41.0, 17.5, 203.0)
RAS_ORDERED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
CANCEL_LIMIT_SECONDS = 5.0
STARTUP_LIMIT_SECONDS = 180.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A real TorchScript package whose output has lung and infection on the phantom."""
    return write_model_package(tmp_path_factory.mktemp("model"), lung_and_infection_net(), "lunginf")


@pytest.fixture(scope="module")
def phantom():
    return chest_phantom(shape=(20, 112, 112), spacing=(0.8, 0.8, 2.5), infection_in_right=True)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def logic_for(model_path: Path, batch_size: int = 4) -> SegmentationLogic:
    return SegmentationLogic(sys.executable, model=model_path, batchSize=batch_size)


def drive(run, until=lambda run: False, limit: float = STARTUP_LIMIT_SECONDS) -> tuple[list[str], list[tuple[int, int]]]:
    """Poll as the panel's timer does until the run ends or ``until(run)``; returns (stages, progress) seen."""
    stages: list[str] = []
    progress: list[tuple[int, int]] = []
    deadline = time.monotonic() + limit
    while True:
        finished = run.poll()
        if run.stage and (not stages or stages[-1] != run.stage):
            stages.append(run.stage)
        if run.slicesTotal and (not progress or progress[-1] != (run.slicesDone, run.slicesTotal)):
            progress.append((run.slicesDone, run.slicesTotal))
        if finished or until(run):
            return stages, progress
        assert time.monotonic() < deadline, f"no end after {limit} s (stage {run.stage})"
        time.sleep(0.02)


def process_gone(pid: int) -> bool:
    """True when neither the child nor anything in its process group is alive (POSIX)."""
    if os.name == "nt":
        return True  # Popen.wait returned: the child has exited; taskkill /T took its tree
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def tag_of(segment, name: str) -> str:
    value = vtk.reference("")
    assert segment.GetTag(name, value), f"segment {segment.GetName()} has no {name} tag"
    return str(value)


# ---------------------------------------------------------------------------------------- success


def test_child_reports_progress_and_its_result_lands_in_the_scene(scene, model_path, phantom):
    image = phantom.image(direction=RAS_ORDERED, origin=ORIGIN)
    volume = imageToVolumeNode(image, scene, "chest")
    expected = segment_image(image, load_model_package(model_path))  # the engine in this process, same image
    count = scene.GetNumberOfNodes()

    run = logic_for(model_path).start(volume)
    assert scene.GetNumberOfNodes() == count  # nothing is added while the child works
    stages, progress = drive(run)

    assert run.state == SUCCEEDED, run.error
    assert [stage for stage in worker.STAGES if stage in stages] == stages  # in protocol order
    assert {"loading_model", "inference", "writing"} <= set(stages)
    assert progress[-1] == (20, 20) and all(done <= total for done, total in progress)

    node = run.applied.segmentationNode
    segmentation = node.GetSegmentation()
    assert [segmentation.GetSegment(i).GetName() for i in segmentation.GetSegmentIDs()] == [s["name"] for s in SEGMENTS]
    # The labelmap is on the input's grid: same IJK-to-RAS, same voxels as the engine gives in-process.
    voxels, imageToWorld, _ = labelmap_of(node, "Right_lung")
    np.testing.assert_allclose(imageToWorld, ijkToRasArray(volume), atol=1e-9)
    assert np.array_equal(voxels, sitk.GetArrayViewFromImage(expected.labelmap))
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    # Terminology through SetTag, as Slicer 5.6 to current read it.
    for definition in SEGMENTS:
        segment = segmentation.GetSegment(definition["name"].replace(" ", "_"))
        entry = tag_of(segment, slicer.vtkSegment.GetTerminologyEntryTagName())
        assert entry == terminology_entry(definition["terminology"])
        assert segment.GetLabelValue() == definition["value"]
        assert segment.GetColor() == pytest.approx([c / 255 for c in definition["color"]])
    # The table.
    table = measurementsFromTable(run.applied.tableNode)
    for region, title in (("right_lung", "Right lung"), ("left_lung", "Left lung"), ("total", "Both lungs")):
        row = expected.measurements.region(region).to_dict()
        assert table[title]["grade_name"] == row["grade_name"]
        for column in ("lung_ml", "infection_ml", "percent_infected", "grade"):  # via JSON: mL to 3 decimals
            assert table[title][column] == pytest.approx(row[column], abs=2e-3)
    assert run.applied.measurements.right_lung.lung_ml == pytest.approx(phantom.right_lung.sum() * phantom.voxel_ml, abs=1e-3)
    assert any("volume 'chest'" in warning for warning in run.applied.warnings)  # messages name the node
    assert run.applied.notes == expected.notes and expected.notes  # the post-processing's notes come back too


def test_blocking_process_is_the_same_path_and_cleans_up(scene, model_path, phantom, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the logic puts the input file and the result
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    applied = logic_for(model_path).process(volume, device="cpu")
    assert applied.segmentationNode.GetSegmentation().GetNumberOfSegments() == 3
    assert applied.result.device == "cpu"
    assert list(tmp_path.iterdir()) == []  # the temporary input and result files are gone


def test_mirror_averaging_reaches_the_child_and_is_recorded_on_the_node(scene, phantom, tmp_path):
    # HalfBlindNet misses the lung on the image's left half; averaged with the mirror it finds it.
    manifest = write_model_package(tmp_path / "model", HalfBlindNet(), "halfblind")
    image = phantom.image(origin=ORIGIN)
    package = load_model_package(manifest)
    expected = {flip: sitk.GetArrayFromImage(segment_image(image, package, flip_tta=flip).labelmap) for flip in (False, True)}
    assert np.count_nonzero(expected[True] != expected[False]) > 1000  # the option matters for this network
    volume = imageToVolumeNode(image, scene, "chest")
    for flip in (False, True):
        applied = logic_for(manifest).process(volume, device="cpu", flipTTA=flip)
        node = applied.segmentationNode
        assert np.array_equal(labelmap_of(node, "Left_lung")[0], expected[flip])
        assert applied.result.flip_tta is flip
        assert node.GetAttribute("CovidInfectionSeg.flipTTA") == ("true" if flip else "false")


def test_nodule_check_switch_reaches_the_child_and_is_recorded_on_the_node(scene, model_path, phantom):
    # The phantom's infection is a small solid blob: a nodule to the check, kept as infection without it.
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    infection_voxels = {}
    for checked in (True, False):
        applied = logic_for(model_path).process(volume, device="cpu", noduleCheck=checked)
        node = applied.segmentationNode
        assert applied.result.nodule_check is checked
        assert node.GetAttribute("CovidInfectionSeg.noduleCheck") == ("true" if checked else "false")
        assert any("small solid components" in note for note in applied.notes) is checked
        value = node.GetSegmentation().GetSegment("Infection").GetLabelValue()
        infection_voxels[checked] = int(np.count_nonzero(labelmap_of(node, "Infection")[0] == value))
    assert infection_voxels[True] == 0
    assert infection_voxels[False] == pytest.approx(np.count_nonzero(phantom.infection), rel=0.05)


# ----------------------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("stage", worker.STAGES)
def test_cancel_in_each_stage_kills_the_child_and_adds_nothing(stage, scene, model_path, phantom, monkeypatch, capsys):
    monkeypatch.setenv(worker.HOLD_STAGE_ENV_VAR, stage)  # the child stays in this stage until killed
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    count = scene.GetNumberOfNodes()
    run = logic_for(model_path).start(volume)
    drive(run, until=lambda run: run.stage == stage)
    assert run.state == "running" and run.stage == stage

    seconds = run.cancel()
    with capsys.disabled():
        print(f"\ncancel during '{stage}': the engine process had exited {seconds:.3f} s after Cancel")

    assert seconds < CANCEL_LIMIT_SECONDS
    assert run.state == CANCELLED and run.applied is None
    assert process_gone(run.pid)
    assert run.poll() and run.applied is None  # a late poll (the panel's timer) adds nothing
    assert scene.GetNumberOfNodes() == count


def test_cancel_during_real_inference(scene, model_path, capsys):
    """No hold: the child is busy in the network (one slice per batch) when it is killed."""
    image = chest_phantom(shape=(240, 112, 112), spacing=(0.8, 0.8, 1.0)).image(origin=ORIGIN)
    volume = imageToVolumeNode(image, scene, "long chest")
    count = scene.GetNumberOfNodes()
    run = logic_for(model_path, batch_size=1).start(volume)
    drive(run, until=lambda run: run.slicesDone >= 2)
    assert run.slicesDone < run.slicesTotal == 240, "the network finished before Cancel: the test needs more slices"
    seconds = run.cancel()
    with capsys.disabled():
        print(f"\ncancel after {run.slicesDone}/240 slices: the engine process had exited {seconds:.3f} s after Cancel")
    assert seconds < CANCEL_LIMIT_SECONDS and process_gone(run.pid)
    assert scene.GetNumberOfNodes() == count


# ----------------------------------------------------------------------------------------- errors


def test_bad_input_comes_back_with_the_cli_message(scene, model_path, tmp_path):
    """A constant volume: the engine refuses it, and the panel shows what `covidseg segment` prints."""
    image = sitk.Image(64, 64, 20, sitk.sitkInt16) - 1000
    volume = imageToVolumeNode(image, scene, "blank")
    count = scene.GetNumberOfNodes()
    run = logic_for(model_path).start(volume)
    drive(run)
    assert run.state == FAILED and isinstance(run.error, EngineError) and run.error.kind == "input"
    assert scene.GetNumberOfNodes() == count

    path = tmp_path / "blank.nrrd"
    sitk.WriteImage(image, str(path))
    cli = subprocess.run([sys.executable, "-m", "CovidInfectionSegLib.cli", "segment", str(path), "-o", str(tmp_path / "o"),
                          "--model", str(model_path), "-q"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 2
    cli_message = cli.stderr.strip().splitlines()[-1].removeprefix("covidseg: ")
    assert str(run.error) == cli_message.replace(str(path), "volume 'blank'")
    assert str(run.error) == "volume 'blank': constant image (every voxel is -1000); nothing to segment"


def test_unreadable_file_and_bad_model_messages_match_the_cli(model_path, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a NIfTI file")
    bad_model = tmp_path / "bad.json"
    bad_model.write_text("{not json")
    for arguments, kind, code in (([broken, "--model", model_path], "input", 2), ([broken, "--model", bad_model], "model", 3)):
        folder = tmp_path / f"run-{kind}"
        folder.mkdir()
        process = EngineProcess(sys.executable, ["segment", "--input", arguments[0], "--output-dir", folder, *arguments[1:]], folder)
        assert process.wait(STARTUP_LIMIT_SECONDS) == code
        errors = [message for message in process.poll() if message["event"] == "error"]
        assert [(error["kind"], error["exit_code"]) for error in errors] == [(kind, code)]
        cli = subprocess.run([sys.executable, "-m", "CovidInfectionSegLib.cli", "segment", *map(str, arguments),
                              "-o", str(tmp_path / "o"), "-q"], capture_output=True, text=True, timeout=300)
        assert cli.returncode == code
        assert cli.stderr.strip().splitlines()[-1] == f"covidseg: {errors[0]['message']}"


def test_engine_that_cannot_start_is_an_error_not_a_hang(scene, phantom, tmp_path):
    not_python = tmp_path / "not-python"
    not_python.write_text("#!/bin/sh\necho 'no python here' >&2\nexit 9\n")
    not_python.chmod(0o755)
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    count = scene.GetNumberOfNodes()
    with pytest.raises(EngineError, match=r"stopped without a result \(exit code 9\):\nno python here"):
        SegmentationLogic(str(not_python)).process(volume, timeout=60)
    assert scene.GetNumberOfNodes() == count


def test_node_removed_while_segmenting_adds_nothing(scene, model_path, phantom):
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    run = logic_for(model_path).start(volume)
    scene.RemoveNode(volume)
    count = scene.GetNumberOfNodes()
    drive(run)
    assert run.state == FAILED and "was removed from the scene while segmenting" in str(run.error)
    assert scene.GetNumberOfNodes() == count


def test_losing_the_temporary_folder_fails_the_run_and_kills_the_child(scene, model_path, phantom, monkeypatch):
    import shutil

    monkeypatch.setenv(worker.HOLD_STAGE_ENV_VAR, "inference")
    volume = imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest")
    count = scene.GetNumberOfNodes()
    run = logic_for(model_path).start(volume)
    drive(run, until=lambda run: run.stage == "inference")
    shutil.rmtree(run.folder)  # e.g. a temp cleaner
    assert run.poll()
    assert run.state == FAILED and "lost contact with the engine" in str(run.error)
    assert process_gone(run.pid) and scene.GetNumberOfNodes() == count


# ------------------------------------------------------------------------------ device, protocol


def test_device_query_runs_in_the_child(model_path):
    query = logic_for(model_path).queryDevice("cpu")
    deadline = time.monotonic() + STARTUP_LIMIT_SECONDS
    while not query.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    import torch

    assert query.error is None
    assert query.info["torch"] == torch.__version__ and query.info["picked"] == "cpu"
    assert query.info["cuda_available"] == torch.cuda.is_available()


def test_a_device_query_that_loses_its_folder_ends_with_an_error_instead_of_raising_on_each_tick(model_path):
    import shutil

    query = logic_for(model_path).queryDevice("cpu")
    shutil.rmtree(query.folder)  # e.g. a temp cleaner, before the child has answered
    assert query.poll() and query.poll()  # the panel's timer polls again: no exception either time
    assert query.info is None and "lost contact with the engine" in query.error
    assert process_gone(query.pid)


def test_an_interpreter_that_does_not_exist_is_an_error_and_leaves_no_folder(scene, phantom, tmp_path, monkeypatch):
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    logic = SegmentationLogic(str(tmp_path / "no-such-python"))
    with pytest.raises(OSError):
        logic.queryDevice()
    with pytest.raises(OSError):
        logic.start(imageToVolumeNode(phantom.image(origin=ORIGIN), scene, "chest"))
    assert list(temporary.iterdir()) == []


def test_the_slicer_side_never_imports_torch():
    code = ("import sys, CovidInfectionSegSlicer.logic, CovidInfectionSegSlicer.dependencies; "
            "print(sorted(m for m in ('torch', 'cv2', 'scipy') if m in sys.modules))")
    module_dir = str(Path(__file__).resolve().parents[1] / "CovidInfectionSeg")  # not pip-installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [module_dir, os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                               env=env)
    assert json.loads(completed.stdout.replace("'", '"')) == []


def test_protocol_lines_round_trip_and_other_output_is_ignored():
    line = worker.format_message("progress", done=3, total=10)
    assert worker.parse_message(line) == {"event": "progress", "done": 3, "total": 10}
    for other in ("", "progress 3/10", "@covidseg not json", '@covidseg ["a list"]', "WARNING: In /tmp/itk ..."):
        assert worker.parse_message(other) is None
