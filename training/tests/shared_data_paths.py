"""../shared/data for the training tests (the engine tests' Testing/shared_data.py, reused)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_engine_shared_data", Path(__file__).resolve().parents[2] / "Testing" / "shared_data.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
shared_path = _module.shared_path
SHARED_DATA = _module.SHARED_DATA
