"""Shared pytest fixtures: small real model packages. Real-data paths are in shared_data.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The Slicer side (CovidInfectionSegSlicer) is not pip-installed: in Slicer it is found beside the
# module file, here beside the engine package.
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "CovidInfectionSeg"))

from model_factory import write_model_package  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_manifest(tmp_path_factory) -> Path:
    """Manifest path of a real TorchScript ThresholdNet package."""
    return write_model_package(tmp_path_factory.mktemp("model"))
