"""Small pure-Python wheels for tests that let pip install or download from a local folder instead of
PyPI (``--no-index --find-links``, or ``PIP_NO_INDEX`` and ``PIP_FIND_LINKS``)."""

from __future__ import annotations

import zipfile
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A minimal pure-Python wheel holding one module, ``<name with _>.py``."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: covidseg-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel
