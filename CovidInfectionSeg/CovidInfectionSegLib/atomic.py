"""Write files so that a failure, a full disk, Ctrl-C or ``kill -9`` never leaves half a result.

- :func:`atomic_path` / :func:`write_text_atomic`: one file, written under a temporary name beside it
  and renamed over it when complete.
- :func:`write_output_set`: the files of one result (``<stem>.*``), written into a private staging
  folder beside them and moved in only when every one is complete. Until then the previous result is
  untouched. A staging folder is renamed from ``.partial`` to ``.complete`` before its files are moved
  in, so a run killed while moving is finished by the next run on that folder, and a run killed
  while writing has its partial folder removed (:func:`recover_output_sets`). The previous result's
  files are moved aside (``.previous``) before the new ones go in: on Windows a file that another
  program holds open (a CSV in a spreadsheet) can be neither replaced nor moved, and finding that out
  first keeps the previous result whole (:class:`OutputInUseError`). Each staging folder
  has a lock (``filelock``: ``flock``, which also works on NFS) held by its writer for its lifetime,
  which is how a later run tells a dead writer's folder from a live one.
- :func:`pause_point`: a test-only hook (inert unless ``$COVIDSEG_TEST_PAUSE_AT`` names the point)
  that lets the fault-injection tests kill the process at an exact moment.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

# filelock is imported where a lock is taken, not here: 3D Slicer's own process imports this module
# (for atomic_path) before the module has installed its packages, filelock among them.

# Test hook: a process reaching the named point writes its pid to $COVIDSEG_TEST_PAUSE_FILE and waits
# while that file exists (the test then kills it, or deletes the file to let it go on).
PAUSE_AT_ENV = "COVIDSEG_TEST_PAUSE_AT"
PAUSE_FILE_ENV = "COVIDSEG_TEST_PAUSE_FILE"

COMMIT_LOCK_NAME = ".covidseg-commit.lock"
COMMIT_LOCK_TIMEOUT_S = 60.0
STAGING_PATTERN = re.compile(r"\.(?P<stem>.+)\.covidseg-(?P<token>\d+-[0-9a-f]{8})\.(?P<kind>partial|complete|previous|lock)")


class OutputError(RuntimeError):
    """An output folder or file cannot be written."""


class OutputLockedError(OutputError):
    """Another run holds the output folder (a batch) or its commit lock for too long."""


class OutputInUseError(OutputError):
    """Another program holds a previous output file open, so it cannot be replaced (Windows)."""


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success rename it over ``destination``.

    The temporary name keeps the destination's format suffixes (``.seg.nrrd``, ``.nii.gz``) so writers
    that choose a format from the extension still work. On any exception the temporary file is
    removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=f".part{format_suffix(destination)}",
                                         dir=destination.parent)
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        _usual_mode(temporary_path)
        os.replace(temporary_path, destination)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


def format_suffix(path: Path) -> str:
    """The suffixes a writer may choose the format from (``.nii.gz``, ``.seg.nrrd``, ``.json``): the last
    one or two, when they are short words. Not every dotted part of the name: a name made of a DICOM UID
    would appear twice in the temporary name, past the file systems' 255-byte limit."""
    kept = ""
    for suffix in reversed(path.suffixes[-2:]):
        if not re.fullmatch(r"\.[A-Za-z]{1,6}", suffix):
            break
        kept = suffix + kept
    return kept


def write_text_atomic(destination: str | Path, text: str) -> None:
    with atomic_path(destination) as temporary:
        temporary.write_text(text, encoding="utf-8")


def remove_stale_parts(destination: str | Path) -> list[Path]:
    """Remove temporary files that :func:`atomic_path` left for ``destination`` in a killed run.

    Only for callers that are the sole writer of ``destination`` (a batch holding its folder lock)."""
    destination = Path(destination)
    stale = [path for path in destination.parent.glob(f".{glob_escape(destination.name)}.*.part*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def write_output_set(
    folder: str | Path,
    stem: str,
    write: Callable[[Path], None],
    expected: Sequence[str],
    obsolete: Sequence[str] = (),
) -> list[Path]:
    """Write one result's files all or nothing; return their final paths.

    ``write(staging)`` writes the files into ``staging``, a new folder beside ``folder``'s files.
    When it returns and every name in ``expected`` is there and not empty, the files are synced to
    disk and moved into ``folder`` (replacing the previous result's), and names in ``obsolete`` that
    the new result does not have are removed (an old preview when the new run writes none). If
    ``write`` raises (or Ctrl-C), the staging folder is removed and ``folder`` is as it was. Stale
    staging folders of killed runs in ``folder`` are cleaned up first. Raises :class:`OutputError`.
    """
    from filelock import FileLock

    folder = Path(folder)
    recover_output_sets(folder)
    base = folder / f".{stem}.covidseg-{os.getpid()}-{secrets.token_hex(4)}"
    lock = FileLock(f"{base}.lock")
    lock.acquire(timeout=0)  # a fresh name: nobody else has it
    partial, complete = Path(f"{base}.partial"), Path(f"{base}.complete")
    try:
        partial.mkdir()
        write(partial)
        missing = [name for name in expected if not (partial / name).is_file() or (partial / name).stat().st_size == 0]
        if missing:
            raise OutputError(f"{folder}: the outputs {', '.join(missing)} of {stem} were not written")
        _sync_folder(partial)
        partial.rename(complete)  # from here on the set is complete: a later run finishes the move
        with _commit_lock(folder):
            try:
                return _move_into(complete, folder, obsolete)
            except OutputInUseError:
                # Nothing moved: this run's result is given up. Named partial again first, so that a
                # removal cut short is not taken for a complete set by the next run.
                complete.rename(partial)
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # only there when writing failed
        _release_and_remove(lock)


def recover_output_sets(folder: str | Path) -> list[str]:
    """Finish or remove what killed runs left in ``folder``: complete staging folders are moved in,
    partial ones removed. Folders whose writer is alive (its lock is held) are left alone. Returns a
    line per stale folder handled."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled = []
    with _commit_lock(folder):
        bases = sorted({folder / entry.name.rsplit(".", 1)[0] for entry in folder.iterdir()
                        if STAGING_PATTERN.fullmatch(entry.name)})
        for base in bases:
            lock = FileLock(f"{base}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its writer is alive
            try:
                complete, partial, previous = (Path(f"{base}.{kind}") for kind in ("complete", "partial", "previous"))
                if complete.is_dir():
                    names = ", ".join(path.name for path in _move_into(complete, folder, ()))
                    handled.append(f"finished moving in the complete outputs of a killed run: {names}")
                elif previous.is_dir():  # killed after its set was in, before the old files were deleted
                    shutil.rmtree(previous, ignore_errors=True)
                    handled.append(f"removed the replaced outputs of a killed run ({previous.name})")
                if partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)
                    handled.append(f"removed the partial outputs of a killed run ({partial.name})")
            finally:
                _release_and_remove(lock)
    return handled


_PAUSE_COUNTS: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Test-only hook: inert unless ``$COVIDSEG_TEST_PAUSE_AT`` is ``name`` (the first time this process
    reaches it) or ``name#N`` (the N-th time). Then write this process's pid to
    ``$COVIDSEG_TEST_PAUSE_FILE`` and wait while that file exists (the test kills the process, or
    deletes the file to let it go on)."""
    wanted = os.environ.get(PAUSE_AT_ENV)
    if not wanted or wanted.split("#")[0] != name:
        return
    _PAUSE_COUNTS[name] = _PAUSE_COUNTS.get(name, 0) + 1
    if _PAUSE_COUNTS[name] != int(wanted.split("#")[1] if "#" in wanted else 1):
        return
    signal_path = Path(os.environ[PAUSE_FILE_ENV])
    write_text_atomic(signal_path, f"{os.getpid()} {name}\n")
    while signal_path.exists():
        time.sleep(0.02)


def _move_into(staging: Path, folder: Path, obsolete: Sequence[str]) -> list[Path]:
    """Move the complete set in ``staging`` (``<base>.complete``) into ``folder``; names in ``obsolete``
    that the set lacks are removed. The files it replaces go aside into ``<base>.previous`` first, so
    that a file another program holds open stops the move before anything new is in (the aside files
    go back; :class:`OutputInUseError`). A run killed after that is finished by the next one: the set
    is complete, so it goes forward."""
    names = sorted(path.name for path in staging.iterdir())
    previous = staging.with_name(staging.name.rsplit(".", 1)[0] + ".previous")
    replaced = [name for name in dict.fromkeys([*names, *obsolete]) if (folder / name).exists()]
    if replaced:
        _move_aside(folder, replaced, previous)
    moved = []
    for index, name in enumerate(names):
        if index == 1:
            pause_point("commit")
        os.replace(staging / name, folder / name)
        moved.append(folder / name)
    _sync_directory(folder)
    staging.rmdir()
    shutil.rmtree(previous, ignore_errors=True)
    return moved


def _move_aside(folder: Path, names: Sequence[str], previous: Path) -> None:
    previous.mkdir(exist_ok=True)  # exists already when finishing a killed run's move
    aside: list[str] = []
    for name in names:
        try:
            os.replace(folder / name, previous / name)
        except PermissionError as error:
            for moved in reversed(aside):
                os.replace(previous / moved, folder / moved)
            with contextlib.suppress(OSError):
                previous.rmdir()
            raise OutputInUseError(
                f"{folder / name}: cannot be moved to make way for the new result ({error.strerror}); is it open in "
                "another program, such as a spreadsheet or an image viewer? Close it and run again. The previous "
                "result is unchanged."
            ) from error
        aside.append(name)


def _release_and_remove(lock) -> None:
    """Release a staging folder's lock, then delete its file. In this order because Windows cannot
    delete a file that a lock holds open (filelock deletes it there itself on release)."""
    lock.release()
    with contextlib.suppress(OSError):  # Windows: another run may have opened it since; it is harmless
        Path(lock.lock_file).unlink(missing_ok=True)


@contextlib.contextmanager
def _commit_lock(folder: Path) -> Iterator[None]:
    """Serialise moves into ``folder`` (two runs committing the same stem would interleave files)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / COMMIT_LOCK_NAME))
    try:
        lock.acquire(timeout=COMMIT_LOCK_TIMEOUT_S)
    except Timeout as error:
        raise OutputLockedError(
            f"{folder}: another run has been moving its outputs into this folder for more than "
            f"{COMMIT_LOCK_TIMEOUT_S:g} s (lock {folder / COMMIT_LOCK_NAME})"
        ) from error
    try:
        yield
    finally:
        lock.release()


def _usual_mode(path: Path) -> None:
    """mkstemp creates files readable by the owner only; give them the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _sync_folder(folder: Path) -> None:
    """Flush the staged files to disk before they replace a previous result (power loss)."""
    for path in folder.iterdir():
        with open(path, "r+b") as handle:  # writable: Windows' fsync (_commit) refuses a read-only handle
            os.fsync(handle.fileno())
    _sync_directory(folder)


def _sync_directory(folder: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
