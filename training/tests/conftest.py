"""Fixtures for the training pipeline tests: a synthetic Zenodo record served on 127.0.0.1, prepared once."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_zenodo import FileServer, record_listing, write_record  # noqa: E402

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
    """12 random 64 x 64 slices of 6 cases, each with a lung square holding an infection square, as
    the .npz that ``prepare`` writes."""
    from covidseg_training.data import INFECTION, LUNG, SliceDataset

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 64, 64), dtype=np.uint8)
    labels = np.zeros((12, 64, 64), dtype=np.uint8)
    labels[:, 20:40, 10:30] = LUNG
    labels[:, 25:30, 15:20] = INFECTION
    path = tmp_path / "labelled.npz"
    SliceDataset(images, labels, np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), 2)).save(path)
    return path
