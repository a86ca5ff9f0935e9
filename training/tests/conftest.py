"""Fixtures for the training pipeline tests: a synthetic Zenodo record served on 127.0.0.1, prepared once, and
run_v2.sh's tiny runs of five folds and an all-data model, made once (gpu_scripts.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_zenodo import FileServer, record_listing, write_record  # noqa: E402
from whole_chest import chest_image  # noqa: E402
from labelled_slices import write_labelled_slices  # noqa: E402
from gpu_scripts import make_training_tree, run_gpu_script  # noqa: E402

torch.set_num_threads(1)

@pytest.fixture(scope="session")
def record_archives(tmp_path_factory) -> dict[str, Path]:
    """The four synthetic archives of the record, {name: path}."""
    return write_record(tmp_path_factory.mktemp("record"))


@pytest.fixture()
def record_server(record_archives):
    """A local server holding the archives' bytes and, at ``api/records/3757476``, the record's listing
    with their MD5s (as Zenodo's REST API gives it)."""
    server = FileServer({**{name: path.read_bytes() for name, path in record_archives.items()},
                         "api/records/3757476": record_listing(record_archives)})
    yield server
    server.close()


@pytest.fixture()
def labelled_slices(tmp_path) -> Path:
    return write_labelled_slices(tmp_path / "labelled.npz")


@pytest.fixture(scope="session")
def chest_file(tmp_path_factory):
    """The synthetic whole chest as a NIfTI file in HU, written with a non-canonical orientation (RAS)
    so the engine's reader has to reorient it."""
    image = sitk.DICOMOrient(chest_image(origin_xyz=(0.0, 0.0, 0.0)), "RAS")
    path = tmp_path_factory.mktemp("negatives") / "chest.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="session")
def gpu_run(tmp_path_factory) -> dict:
    """training/gpu/run_v2.sh run once on the CPU in a training/ tree of its own (gpu_scripts.py): the tree,
    its runs/, the folder it wrote results.tar.gz and checkpoints-N.tar to, and the call's result."""
    training = make_training_tree(tmp_path_factory.mktemp("tree"))
    out = training / "runs" / "gpu-out"
    result = run_gpu_script(training, out)
    return {"training": training, "runs": training / "runs", "out": out, "result": result}
