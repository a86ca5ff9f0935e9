"""Output sets all or nothing (atomic.write_output_set), and what killed runs leave behind (recover_output_sets).

Kills of real processes are in test_faults.py; here the staging folders a killed run leaves are laid out
by hand, and a live writer is a real lock held by this process."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from filelock import FileLock

from CovidInfectionSegLib.atomic import (
    COMMIT_LOCK_NAME,
    OutputError,
    OutputInUseError,
    pause_point,
    recover_output_sets,
    remove_stale_parts,
    write_output_set,
)

NAMES = ["scan.a.txt", "scan.b.txt", "scan.c.txt"]


def writer(text: str, names=NAMES):
    def write(staging: Path) -> None:
        for name in names:
            (staging / name).write_text(f"{text} {name}\n", encoding="utf-8")
    return write


def visible(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.iterdir() if not p.name.startswith(".")}


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_set_is_moved_in_complete_and_replaces_the_previous_one(tmp_path):
    write_output_set(tmp_path, "scan", writer("old"), expected=NAMES)
    (tmp_path / "other.txt").write_text("not ours", encoding="utf-8")
    moved = write_output_set(tmp_path, "scan", writer("new", NAMES[:2]), expected=NAMES[:2], obsolete=NAMES)
    assert [p.name for p in moved] == NAMES[:2]
    assert visible(tmp_path) == {"scan.a.txt": "new scan.a.txt\n", "scan.b.txt": "new scan.b.txt\n", "other.txt": "not ours"}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]  # no staging folder or staging lock left


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), ValueError("x")])
def test_a_failure_while_writing_leaves_the_previous_set_untouched(tmp_path, failure):
    write_output_set(tmp_path, "scan", writer("old"), expected=NAMES)
    before = visible(tmp_path)

    def write_two_then_fail(staging: Path) -> None:
        writer("new", NAMES[:2])(staging)
        raise failure

    with pytest.raises(type(failure)):
        write_output_set(tmp_path, "scan", write_two_then_fail, expected=NAMES)
    assert visible(tmp_path) == before
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_an_incomplete_set_is_refused(tmp_path):
    with pytest.raises(OutputError, match=r"scan\.c\.txt of scan were not written"):
        write_output_set(tmp_path, "scan", writer("new", NAMES[:2]), expected=NAMES)
    assert visible(tmp_path) == {}


def killed_run_leftovers(folder: Path, token: str, kind: str, names=NAMES) -> Path:
    """What a run killed while writing (partial) or while moving in (complete) leaves."""
    staging = folder / f".scan.covidseg-{token}.{kind}"
    staging.mkdir()
    writer(f"killed-{kind}", names)(staging)
    (folder / f".scan.covidseg-{token}.lock").touch()
    return staging


def test_the_next_run_removes_partial_and_finishes_complete_leftovers(tmp_path):
    write_output_set(tmp_path, "scan", writer("old"), expected=NAMES)
    killed_run_leftovers(tmp_path, "111-0000000a", "partial")
    handled = recover_output_sets(tmp_path)
    assert handled == ["removed the partial outputs of a killed run (.scan.covidseg-111-0000000a.partial)"]
    assert visible(tmp_path) == {name: f"old {name}\n" for name in NAMES}

    # killed half way through moving in: one file is new already, the other two still in staging
    complete = killed_run_leftovers(tmp_path, "222-0000000b", "complete")
    (complete / NAMES[0]).replace(tmp_path / NAMES[0])
    assert recover_output_sets(tmp_path) == [
        "finished moving in the complete outputs of a killed run: scan.b.txt, scan.c.txt"]
    assert visible(tmp_path) == {name: f"killed-complete {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_a_live_writers_staging_is_left_alone(tmp_path):
    staging = killed_run_leftovers(tmp_path, "333-0000000c", "partial")
    lock = FileLock(str(tmp_path / ".scan.covidseg-333-0000000c.lock"))
    lock.acquire(timeout=0)  # the writer is alive
    try:
        assert recover_output_sets(tmp_path) == []
        assert staging.is_dir()
    finally:
        lock.release()
    assert recover_output_sets(tmp_path) != [] and not staging.exists()


def test_writing_a_set_cleans_up_first(tmp_path):
    killed_run_leftovers(tmp_path, "444-0000000d", "partial")
    write_output_set(tmp_path, "other", writer("x", ["other.txt"]), expected=["other.txt"])
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_stale_parts_of_a_single_file_are_removed(tmp_path):
    (tmp_path / ".summary.csv.abc123.part.csv").write_text("half", encoding="utf-8")
    (tmp_path / ".other.csv.abc123.part.csv").write_text("not this one", encoding="utf-8")
    assert [p.name for p in remove_stale_parts(tmp_path / "summary.csv")] == [".summary.csv.abc123.part.csv"]
    assert hidden(tmp_path) == [".other.csv.abc123.part.csv"]


def test_pause_point_is_inert_by_default(monkeypatch):
    monkeypatch.delenv("COVIDSEG_TEST_PAUSE_AT", raising=False)
    pause_point("staged:labelmap")  # returns at once
    monkeypatch.setenv("COVIDSEG_TEST_PAUSE_AT", "elsewhere")
    pause_point("staged:labelmap")


@pytest.fixture
def windows_file_rules(monkeypatch):
    """Rules of Windows that Linux lacks, enforced here (CI has no Windows): fsync (the C runtime's
    _commit) refuses a handle opened read-only, and a file held open (by a lock, or by another program:
    add its path to the returned set) can be neither deleted, nor replaced, nor moved."""
    import fcntl
    import os

    import filelock

    from CovidInfectionSegLib import atomic

    held: set[str] = set()

    class WindowsLikeLock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            proxy = super().acquire(*args, **kwargs)
            held.add(os.path.abspath(self.lock_file))
            return proxy

        def release(self, *args, **kwargs):
            super().release(*args, **kwargs)
            if not self.is_locked:
                held.discard(os.path.abspath(self.lock_file))

    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync(descriptor: int) -> None:
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY and not os.path.isdir(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(descriptor)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if os.path.abspath(self) in held:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_unlink(self, missing_ok=missing_ok)

    real_replace = os.replace

    def replace(source, destination) -> None:
        if held & {os.path.abspath(source), os.path.abspath(destination)}:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(source, destination)

    monkeypatch.setattr(filelock, "FileLock", WindowsLikeLock)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    return held


def test_a_set_is_written_and_recovered_under_windows_file_rules(tmp_path, windows_file_rules):
    write_output_set(tmp_path, "scan", writer("new"), NAMES)
    assert visible(tmp_path) == {name: f"new {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]
    killed = tmp_path / ".scan.covidseg-1-0000abcd.partial"
    killed.mkdir()
    (killed / "scan.a.txt").write_text("half", encoding="utf-8")
    assert recover_output_sets(tmp_path) == ["removed the partial outputs of a killed run (.scan.covidseg-1-0000abcd.partial)"]
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]
    assert not windows_file_rules, "every lock released"


@pytest.mark.parametrize("suffixes, kept", [(".seg.nrrd", ".seg.nrrd"), (".labels.nii.gz", ".nii.gz"),
                                             (".measurements.json", ".json")])
def test_a_long_dotted_name_is_written_under_a_temporary_name_with_its_format_suffix(tmp_path, suffixes, kept):
    """Scans are often named by their DICOM series UID: 170 characters of digits and dots here. The
    temporary name must not repeat them (255-byte file names), and must keep the format's suffix."""
    from CovidInfectionSegLib.atomic import atomic_path

    stem = ".".join(["1.3.12.2.1107.5.1.4.73422.30000020033107201573100000015"] * 3)
    destination = tmp_path / f"{stem}{suffixes}"
    with atomic_path(destination) as temporary:
        assert temporary.name.endswith(f".part{kept}")
        temporary.write_text("x", encoding="utf-8")
    assert destination.read_text(encoding="utf-8") == "x"


def test_a_file_open_in_another_program_stops_the_move_before_anything_changes(tmp_path, windows_file_rules):
    """A spreadsheet holding the previous result's CSV: the files before it in the move must not have been
    replaced already (a mix of two results), and the error must say what to do."""
    write_output_set(tmp_path, "scan", writer("old"), NAMES)
    spreadsheet = str((tmp_path / NAMES[1]).resolve())
    windows_file_rules.add(spreadsheet)
    with pytest.raises(OutputInUseError, match=r"scan\.b\.txt: cannot be moved to make way for the new result .*open in another program.*Close it and run again"):
        write_output_set(tmp_path, "scan", writer("new"), NAMES)
    assert visible(tmp_path) == {name: f"old {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]
    windows_file_rules.discard(spreadsheet)
    write_output_set(tmp_path, "scan", writer("new"), NAMES)
    assert visible(tmp_path) == {name: f"new {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_a_run_killed_while_moving_the_previous_files_aside_is_finished(tmp_path):
    write_output_set(tmp_path, "scan", writer("old"), expected=NAMES)
    killed_run_leftovers(tmp_path, "555-0000000e", "complete")
    previous = tmp_path / ".scan.covidseg-555-0000000e.previous"
    previous.mkdir()
    (tmp_path / NAMES[0]).replace(previous / NAMES[0])  # killed after moving one old file aside
    assert recover_output_sets(tmp_path) == [
        "finished moving in the complete outputs of a killed run: scan.a.txt, scan.b.txt, scan.c.txt"]
    assert visible(tmp_path) == {name: f"killed-complete {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_the_replaced_files_of_a_run_killed_after_its_move_are_removed(tmp_path):
    write_output_set(tmp_path, "scan", writer("new"), expected=NAMES)
    previous = killed_run_leftovers(tmp_path, "666-0000000f", "previous")  # its set is in, the old files not yet deleted
    assert recover_output_sets(tmp_path) == [f"removed the replaced outputs of a killed run ({previous.name})"]
    assert visible(tmp_path) == {name: f"new {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]


def test_a_given_up_set_whose_removal_is_cut_short_is_not_taken_for_a_complete_one(tmp_path, windows_file_rules, monkeypatch):
    """After a file in use stops the move, the staged set is removed; a removal cut short (Ctrl-C, a
    virus scanner holding a staged file) must not leave a '.complete' folder that the next run moves in."""
    import shutil

    write_output_set(tmp_path, "scan", writer("old"), NAMES)
    windows_file_rules.add(str((tmp_path / NAMES[1]).resolve()))
    real_rmtree = shutil.rmtree

    def rmtree_cut_short(path, *args, **kwargs):
        staged = sorted(Path(path).iterdir()) if Path(path).is_dir() else []
        if staged:
            staged[-1].unlink()  # one file removed, then interrupted
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree_cut_short)
    with pytest.raises((OutputInUseError, KeyboardInterrupt)):
        write_output_set(tmp_path, "scan", writer("new"), NAMES)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    windows_file_rules.clear()
    recover_output_sets(tmp_path)
    assert visible(tmp_path) == {name: f"old {name}\n" for name in NAMES}
    assert hidden(tmp_path) == [COMMIT_LOCK_NAME]
