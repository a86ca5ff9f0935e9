"""Write files under a temporary name and rename, so a failure never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success rename it over ``destination``.

    The temporary name keeps the destination's suffixes (``.seg.nrrd``, ``.nii.gz``) so writers
    that choose a format from the extension still work. On any exception the temporary file is
    removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    suffix = "".join(destination.suffixes)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=f".part{suffix}", dir=destination.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp creates files readable by the owner only; give them the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        os.replace(temporary_path, destination)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def write_text_atomic(destination: str | Path, text: str) -> None:
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")
