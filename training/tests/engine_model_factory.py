"""The engine tests' Testing/model_factory.py (real tiny TorchScript packages), reused by the training tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_engine_model_factory", Path(__file__).resolve().parents[2] / "Testing" / "model_factory.py")
model_factory = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = model_factory  # a module's dataclasses look it up there
_spec.loader.exec_module(model_factory)
