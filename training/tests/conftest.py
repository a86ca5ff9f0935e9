"""Fixtures for the training pipeline tests: a synthetic Zenodo record served on 127.0.0.1, prepared once."""

from __future__ import annotations

import sys
from pathlib import Path

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
