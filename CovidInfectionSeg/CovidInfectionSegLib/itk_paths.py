"""Paths that SimpleITK can open on Windows.

SimpleITK hands ITK a path as UTF-8 bytes, and ITK opens files through the narrow Windows API, which
reads those bytes in the process's ANSI code page. So on Windows a path with a character outside
ASCII (``C:\\Users\\José\\...``, a Chinese folder name) is "not found" unless the process runs with
the UTF-8 code page (SimpleITK's FAQ; SimpleITK issues 651, 795, 1255). The 3D Slicer application is
built with that code page, but the Python it starts for the engine (``PythonSlicer``) and an ordinary
Python are not: there the engine's temporary folder under the user's profile, or a scan in a folder
with an accented name, could not be read. :func:`itk_path` gives SimpleITK the folder's short (8.3)
name instead, which Windows makes of ASCII characters, or says clearly what to do when there is none.
Elsewhere it returns the path as it is.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

from .atomic import format_suffix

UTF8_CODE_PAGE = 65001
TURN_ON_UTF8 = "turn on 'Beta: Use Unicode UTF-8 for worldwide language support' in Windows' region settings"


def itk_path(path: str | Path) -> str:
    """``path`` (a file to read or write, or a folder to scan) as a string SimpleITK can open.

    On Windows without the UTF-8 code page, a path with characters outside ASCII becomes its folder's
    short (8.3) name and the file's own name: a short file name would lose the extension that tells
    SimpleITK the format (``.nrrd`` becomes ``.NRR``). Raises OSError naming the path and the way out
    when the file's name is not ASCII or Windows has no ASCII short name for its folder.
    """
    text = str(path)
    if text.isascii() or not _narrow_paths_lose_characters():
        return text
    if os.path.isdir(text):
        folder, name = text, ""
    else:
        folder, name = os.path.split(text)
    if not name.isascii():
        raise OSError(f"{text}: SimpleITK cannot open a file whose name has characters outside ASCII on this "
                      f"Windows; give the file a plain ASCII name, or {TURN_ON_UTF8}")
    short = _short_path(folder)
    if short is None or not short.isascii():
        raise OSError(f"{text}: SimpleITK cannot open a path with characters outside ASCII on this Windows, and "
                      "Windows has no short (8.3) name for its folder; move it to a folder whose path is plain "
                      f"ASCII (for the temporary files: set the TEMP variable to such a folder), or {TURN_ON_UTF8}")
    return os.path.join(short, name) if name else short


def name_closed_to_itk(path: str | Path) -> bool:
    """True where SimpleITK cannot open ``path`` by its own file name, whatever its folder: on Windows
    without the UTF-8 code page, a name with characters outside ASCII. A DICOM folder's files are found
    and opened by GDCM itself, so such a file is one GDCM lists but cannot read."""
    return not Path(path).name.isascii() and _narrow_paths_lose_characters()


@contextlib.contextmanager
def itk_output_path(path: str | Path) -> Iterator[str]:
    """Where SimpleITK can write ``path``: :func:`itk_path` of it, or, where that needs an ASCII file name
    (Windows without UTF-8) and ours is not (outputs are named after the scan), an ASCII-named file
    beside it with the same format suffix, renamed to ``path`` once written (removed if writing fails)."""
    path = Path(path)
    if path.name.isascii() or not _narrow_paths_lose_characters():
        yield itk_path(path)
        return
    stand_in = path.with_name(f".covidseg-{secrets.token_hex(4)}{format_suffix(path)}")
    try:
        yield itk_path(stand_in)
        os.replace(stand_in, path)
    finally:
        stand_in.unlink(missing_ok=True)


def _narrow_paths_lose_characters() -> bool:
    """True on Windows when this process's ANSI code page is not UTF-8."""
    if os.name != "nt":
        return False
    import ctypes

    return ctypes.windll.kernel32.GetACP() != UTF8_CODE_PAGE


def _short_path(path: str) -> str | None:
    """The 8.3 form of an existing path (GetShortPathNameW), or None."""
    import ctypes
    from ctypes import wintypes

    get_short_path = ctypes.windll.kernel32.GetShortPathNameW
    get_short_path.argtypes = [wintypes.LPCWSTR, wintypes.LPWSTR, wintypes.DWORD]
    get_short_path.restype = wintypes.DWORD
    size = get_short_path(path, None, 0)
    if size == 0:
        return None
    buffer = ctypes.create_unicode_buffer(size)
    return buffer.value if get_short_path(path, buffer, size) else None
