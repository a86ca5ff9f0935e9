"""Fetch the COVID-19 CT Lung and Infection Segmentation Dataset (Ma et al. 2020, Zenodo record 3757476).

    python -m covidseg_training download --out data/zenodo [--only Lung_Mask.zip] [--no-extract]

Each archive is downloaded to ``<name>.part`` and resumed with an HTTP Range request when the
connection drops (or when the command is run again), checked against the checksums below, renamed,
recorded in ``checksums.json`` (so a verified file is skipped next time) and unpacked into
``<out>/<archive stem>/``.

Checksums: the MD5 of every file is read from the record itself (Zenodo's REST API,
``https://zenodo.org/api/records/3757476``, ``files[].checksum``) just before downloading, and every
file must match it. When that listing cannot be read (offline, with files put in place by hand), the
files are checked against SHA-256 values pinned here instead: the ones the torch-em project pins for
the same four URLs (torch_em/data/datasets/medical/covid19_seg.py), which we have not been able to
compare with the files ourselves. The computed MD5 and SHA-256 of every file go to ``checksums.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable

from CovidInfectionSegLib.atomic import write_text_atomic

ZENODO_RECORD = "3757476"
ZENODO_FILES_URL = f"https://zenodo.org/records/{ZENODO_RECORD}/files"
ZENODO_API_URL = f"https://zenodo.org/api/records/{ZENODO_RECORD}"
CHUNK = 1 << 20
STATE_FILE = "checksums.json"
# What a dropped or unreachable connection raises (URLError includes HTTPError).
NETWORK_ERRORS = (urllib.error.URLError, socket.timeout, ConnectionError, HTTPException, TimeoutError)


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch; a checksum of None is not checked (but is computed and recorded)."""

    name: str
    url: str
    md5: str | None = None
    sha256: str | None = None


PINNED_SHA256 = {  # torch-em's pins for this record: the fallback when the record's own MD5s cannot be read
    "COVID-19-CT-Seg_20cases.zip": "a5060480eff9315b069b086312dac4872777901fb80d268a5a83edd9f4e7b440",
    "Lung_Mask.zip": "f060b0d0299939a6d95ddefdbfa281de1a779c4d230a5adbd32414711d6d8187",
    "Infection_Mask.zip": "87901c73fdd2230260e61d2dbc57bf56026efc28264006b8ea2bf411453c1694",
    "Lung_and_Infection_Mask.zip": "34f5a573cb8fb53cb15abe81868395d9addf436854826a6fd6e70c2b294f19c3",
}


def zenodo_files(base_url: str = ZENODO_FILES_URL, record_md5: dict[str, str] | None = None) -> list[RemoteFile]:
    """The four archives of record 3757476 (``base_url`` lets a mirror stand in for Zenodo), checked
    against the record's MD5 where ``record_md5`` has it, else against the pinned SHA-256."""
    record_md5 = record_md5 or {}
    return [RemoteFile(name, f"{base_url.rstrip('/')}/{name}?download=1", md5=record_md5.get(name),
                       sha256=None if name in record_md5 else sha256)
            for name, sha256 in PINNED_SHA256.items()]


class DownloadError(RuntimeError):
    """The server could not be reached or the transfer failed for good."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its pinned checksum (the bad file has been removed)."""


def file_checksums(path: Path) -> dict[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _read_state(folder: Path) -> dict[str, dict]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except ValueError:
        return {}  # a damaged record only costs a re-check


def _record(folder: Path, name: str, entry: dict) -> None:
    state = _read_state(folder)
    state[name] = entry
    write_text_atomic(folder / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _already_verified(remote: RemoteFile, destination: Path) -> bool:
    """True when ``destination`` is the file recorded in checksums.json and agrees with the pinned sums."""
    entry = _read_state(destination.parent).get(remote.name)
    if not destination.is_file() or not entry or entry.get("size") != destination.stat().st_size:
        return False
    return all(entry.get(kind) == expected for kind, expected in (("md5", remote.md5), ("sha256", remote.sha256))
               if expected)


def _transfer(url: str, part: Path, timeout: float) -> bool:
    """Append the rest of ``url`` to ``part`` (Range from its current size); True when the file is complete."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left to send: the .part is already whole
            return True
        raise DownloadError(f"{url}: HTTP {error.code} {error.reason}") from error
    with response:
        resumed = response.status == 206
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected is not None else None
        received = 0
        with open(part, "ab" if resumed else "wb") as handle:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
    return expected is None or received >= expected


def download_file(remote: RemoteFile, folder: Path, *, retries: int = 3, timeout: float = 60.0,
                  log: Callable[[str], None] = print) -> Path:
    """Download ``remote`` into ``folder`` (resuming a ``.part``), verify, record and return the file path."""
    folder.mkdir(parents=True, exist_ok=True)
    destination = folder / remote.name
    if _already_verified(remote, destination):
        log(f"{remote.name}: already downloaded and verified, skipped")
        return destination
    if destination.is_file():  # put there by hand (ours only appear after verification)
        return _adopt_existing(remote, destination, log)
    part = destination.with_name(destination.name + ".part")
    for attempt in range(retries + 1):
        try:
            if _transfer(remote.url, part, timeout):
                break
            log(f"{remote.name}: connection closed early at {part.stat().st_size} bytes; resuming")
        except NETWORK_ERRORS as error:
            reason = getattr(error, "reason", error)
            if isinstance(error, urllib.error.URLError) and not part.exists():
                raise DownloadError(
                    f"{remote.url}: cannot reach the server ({reason}). Without internet access, download "
                    f"{remote.name} by hand from https://zenodo.org/records/{ZENODO_RECORD} into {folder} and rerun: "
                    "the file will be verified and unpacked"
                ) from error
            log(f"{remote.name}: transfer interrupted ({reason}); attempt {attempt + 1} of {retries + 1}")
    else:
        raise DownloadError(f"{remote.url}: still incomplete after {retries + 1} attempts; rerun to resume "
                            f"from {part} ({part.stat().st_size if part.exists() else 0} bytes)")
    computed = file_checksums(part)
    for kind, expected in (("md5", remote.md5), ("sha256", remote.sha256)):
        if expected and computed[kind] != expected.lower():
            part.unlink()
            raise ChecksumError(f"{remote.name}: {kind} mismatch: expected {expected}, got {computed[kind]}; "
                                "the download was removed (corrupt transfer or a changed file on the server)")
    part.replace(destination)
    _record_verified(remote, destination, computed, log)
    return destination


def _record_verified(remote: RemoteFile, destination: Path, computed: dict[str, str],
                     log: Callable[[str], None]) -> None:
    verified = [kind for kind in ("md5", "sha256") if getattr(remote, kind)]
    _record(destination.parent, remote.name, {**computed, "size": destination.stat().st_size, "url": remote.url,
                                              "verified_against": verified})
    log(f"{remote.name}: {destination.stat().st_size} bytes, md5 {computed['md5']}"
        + (f", verified {'+'.join(verified)}" if verified else ", no checksum pinned: recorded only"))


def _adopt_existing(remote: RemoteFile, destination: Path, log: Callable[[str], None]) -> Path:
    """Check a file that is already in place but not yet recorded; keep it if it matches the pins."""
    computed = file_checksums(destination)
    for kind, expected in (("md5", remote.md5), ("sha256", remote.sha256)):
        if expected and computed[kind] != expected.lower():
            raise ChecksumError(f"{destination}: {kind} mismatch: expected {expected}, got {computed[kind]}; "
                                "this file was not written by the downloader: delete it to download it again")
    log(f"{remote.name}: found in place")
    _record_verified(remote, destination, computed, log)
    return destination


def extract_archive(archive: Path, target: Path) -> Path:
    """Unpack ``archive`` into ``target`` (via a temporary folder; refuses paths that escape it)."""
    if (target / ".complete").exists():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.namelist():
                resolved = (staging / member).resolve()
                if not resolved.is_relative_to(staging.resolve()):
                    raise DownloadError(f"{archive}: member {member!r} would be written outside {target}")
            bundle.extractall(staging)
    except zipfile.BadZipFile as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{archive}: not a valid zip archive ({error})") from error
    (staging / ".complete").write_text(archive.name + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)
    return target


def read_record_md5(api_url: str = ZENODO_API_URL, timeout: float = 30.0) -> dict[str, str]:
    """File name -> MD5 as the Zenodo record lists them (REST API: ``files[].key``, ``checksum "md5:..."``)."""
    try:
        with urllib.request.urlopen(api_url, timeout=timeout) as response:
            record = json.load(response)
    except (*NETWORK_ERRORS, ValueError) as error:  # ValueError: not JSON
        raise DownloadError(f"{api_url}: cannot read the record's file list ({getattr(error, 'reason', error)})") from error
    md5 = {}
    for entry in record.get("files", []) if isinstance(record, dict) else []:
        name = entry.get("key") or entry.get("filename")
        algorithm, _, value = str(entry.get("checksum", "")).partition(":")
        if name and algorithm == "md5" and value:
            md5[name] = value.lower()
    if not md5:
        raise DownloadError(f"{api_url}: the record's file list holds no MD5 checksums")
    return md5


def checked_zenodo_files(base_url: str = ZENODO_FILES_URL, api_url: str = ZENODO_API_URL,
                         log: Callable[[str], None] = print) -> list[RemoteFile]:
    """:func:`zenodo_files` with the record's MD5s, or with the pinned SHA-256 when the record cannot be read."""
    try:
        record_md5 = read_record_md5(api_url)
    except DownloadError as error:
        log(f"warning: {error}; checking the files against the pinned SHA-256 instead")
        return zenodo_files(base_url)
    files = zenodo_files(base_url, record_md5)
    unlisted = [f.name for f in files if f.md5 is None]
    if unlisted:
        log(f"warning: the record lists no MD5 for {', '.join(unlisted)}; checking the pinned SHA-256 for those")
    return files


def download_dataset(out_dir: str | Path, files: list[RemoteFile] | None = None, *, extract: bool = True,
                     retries: int = 3, timeout: float = 60.0, log: Callable[[str], None] = print) -> list[Path]:
    """Download (and unpack) every file; returns the archive paths."""
    out_dir = Path(out_dir)
    paths = []
    for remote in files if files is not None else checked_zenodo_files(log=log):
        path = download_file(remote, out_dir, retries=retries, timeout=timeout, log=log)
        if extract and path.suffix == ".zip":
            extract_archive(path, out_dir / path.stem)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="covidseg_training download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/zenodo"), help="download folder")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these archives (file names)")
    parser.add_argument("--base-url", default=ZENODO_FILES_URL, help="a mirror of the record's files")
    parser.add_argument("--api-url", default=ZENODO_API_URL, help="where to read the record's MD5 list")
    parser.add_argument("--no-extract", action="store_true", help="keep the zips packed")
    parser.add_argument("--retries", type=int, default=3)
    args = parser.parse_args(argv)
    files = checked_zenodo_files(args.base_url, args.api_url, log=lambda message: print(message, file=sys.stderr))
    if args.only:
        unknown = set(args.only) - {f.name for f in files}
        if unknown:
            parser.error(f"unknown archive(s) {sorted(unknown)}; choose from {[f.name for f in files]}")
        files = [f for f in files if f.name in args.only]
    try:
        download_dataset(args.out, files, extract=not args.no_extract, retries=args.retries)
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
