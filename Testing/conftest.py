"""Shared pytest fixtures: real data paths (skipped when absent) and small real model packages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_factory import write_model_package  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_path(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason when it is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (only on the project's build machines)")
    return path


@pytest.fixture(scope="session")
def tiny_model_manifest(tmp_path_factory) -> Path:
    """Manifest path of a real TorchScript ThresholdNet package."""
    return write_model_package(tmp_path_factory.mktemp("model"))
