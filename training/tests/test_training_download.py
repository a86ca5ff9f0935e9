"""The downloader against a real HTTP server on 127.0.0.1: checksums, resume, offline, unpacking."""

from __future__ import annotations

import hashlib
import json
import socket
import zipfile

import pytest

from covidseg_training.download import (
    PINNED_SHA256,
    ChecksumError,
    DownloadError,
    RemoteFile,
    checked_zenodo_files,
    download_dataset,
    download_file,
    extract_archive,
    main,
    read_record_md5,
    zenodo_files,
)
from synthetic_zenodo import FileServer, record_listing

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, several read chunks


def remote(server: FileServer, name: str, **checksums) -> RemoteFile:
    return RemoteFile(name, f"{server.url}/{name}?download=1", **checksums)


@pytest.fixture()
def server():
    server = FileServer({"data.bin": PAYLOAD})
    yield server
    server.close()


def test_download_verifies_records_and_skips_a_verified_file(server, tmp_path):
    pinned = remote(server, "data.bin", md5=hashlib.md5(PAYLOAD).hexdigest(),
                    sha256=hashlib.sha256(PAYLOAD).hexdigest())
    path = download_file(pinned, tmp_path, log=lambda _: None)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "data.bin.part").exists()
    entry = json.loads((tmp_path / "checksums.json").read_text(encoding="utf-8"))["data.bin"]
    assert entry["md5"] == pinned.md5 and entry["sha256"] == pinned.sha256
    assert entry["size"] == len(PAYLOAD) and entry["verified_against"] == ["md5", "sha256"]
    messages = []
    download_file(pinned, tmp_path, log=messages.append)
    assert len(server.requests) == 1, "a verified file must not be fetched again"
    assert "already downloaded and verified" in messages[0]


def test_unpinned_file_records_computed_checksums(server, tmp_path):
    download_file(remote(server, "data.bin"), tmp_path, log=lambda _: None)
    entry = json.loads((tmp_path / "checksums.json").read_text(encoding="utf-8"))["data.bin"]
    assert entry["md5"] == hashlib.md5(PAYLOAD).hexdigest() and entry["verified_against"] == []


def test_checksum_mismatch_is_an_error_and_removes_the_file(server, tmp_path):
    with pytest.raises(ChecksumError, match="data.bin: md5 mismatch"):
        download_file(remote(server, "data.bin", md5="0" * 32), tmp_path, log=lambda _: None)
    assert not (tmp_path / "data.bin").exists() and not (tmp_path / "data.bin.part").exists()
    assert not (tmp_path / "checksums.json").exists()


def test_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    server.cut_once.add("data.bin")
    pinned = remote(server, "data.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    with pytest.raises(DownloadError, match="still incomplete"):
        download_file(pinned, tmp_path, retries=0, log=lambda _: None)
    part = tmp_path / "data.bin.part"
    assert 0 < part.stat().st_size < len(PAYLOAD)
    resumed_from = part.stat().st_size
    path = download_file(pinned, tmp_path, retries=0, log=lambda _: None)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [("data.bin", None), ("data.bin", f"bytes={resumed_from}-")]


def test_interruption_is_retried_within_one_call(server, tmp_path):
    server.cut_once.add("data.bin")
    messages = []
    path = download_file(remote(server, "data.bin"), tmp_path, retries=2, log=messages.append)
    assert path.read_bytes() == PAYLOAD
    assert any("resuming" in m or "interrupted" in m for m in messages)
    assert server.requests[1][1] is not None


def free_port() -> int:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_offline_gives_a_clear_message(tmp_path):
    with pytest.raises(DownloadError, match="cannot reach the server.*zenodo.org/records/3757476"):
        download_file(RemoteFile("x.zip", f"http://127.0.0.1:{free_port()}/x.zip"), tmp_path, retries=0,
                      log=lambda _: None)


def test_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DownloadError, match="missing.zip.*HTTP 404"):
        download_file(remote(server, "missing.zip"), tmp_path, log=lambda _: None)


def test_archive_that_escapes_its_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../outside.txt", "no")
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(archive, tmp_path / "evil")
    assert not (tmp_path / "outside.txt").exists()


def test_dataset_download_checks_the_record_md5_and_unpacks_every_archive(record_server, tmp_path):
    files = checked_zenodo_files(record_server.url, f"{record_server.url}/api/records/3757476", log=lambda _: None)
    assert [f.name for f in files] == ["COVID-19-CT-Seg_20cases.zip", "Lung_Mask.zip", "Infection_Mask.zip",
                                       "Lung_and_Infection_Mask.zip"]
    assert all(f.md5 and f.sha256 is None for f in files), "the record's own MD5 replaces the pinned SHA-256"
    download_dataset(tmp_path, files, log=lambda _: None)
    state = json.loads((tmp_path / "checksums.json").read_text(encoding="utf-8"))
    for f in files:
        assert state[f.name]["md5"] == f.md5 and state[f.name]["verified_against"] == ["md5"]
    for stem in ("COVID-19-CT-Seg_20cases", "Lung_Mask", "Infection_Mask", "Lung_and_Infection_Mask"):
        assert len(list((tmp_path / stem).glob("*.nii.gz"))) == 4
    with pytest.raises(ChecksumError, match="sha256 mismatch"):  # the fallback pins are really checked
        download_file(zenodo_files(record_server.url)[1], tmp_path / "pinned", log=lambda _: None)


def test_read_record_md5_parses_the_listing_and_refuses_a_bad_one(record_archives):
    server = FileServer({"good": record_listing(record_archives), "empty": b'{"files": []}', "html": b"<html>"})
    try:
        md5 = read_record_md5(f"{server.url}/good")
        assert set(md5) == set(record_archives)
        assert md5["Lung_Mask.zip"] == hashlib.md5(record_archives["Lung_Mask.zip"].read_bytes()).hexdigest()
        with pytest.raises(DownloadError, match="no MD5"):
            read_record_md5(f"{server.url}/empty")
        with pytest.raises(DownloadError, match="cannot read the record"):
            read_record_md5(f"{server.url}/html")
    finally:
        server.close()


def test_unreadable_record_falls_back_to_the_pinned_sha256():
    messages = []
    files = checked_zenodo_files("http://mirror.invalid/files", f"http://127.0.0.1:{free_port()}/api", log=messages.append)
    assert {f.name: f.sha256 for f in files} == PINNED_SHA256 and all(f.md5 is None for f in files)
    assert "pinned SHA-256" in messages[0]


def test_cli_refuses_a_file_that_differs_from_the_record(record_archives, tmp_path, capsys):
    wrong = {"Lung_Mask.zip": "0" * 32}
    server = FileServer({**{name: path.read_bytes() for name, path in record_archives.items()},
                         "api": record_listing(record_archives, md5=wrong)})
    try:
        code = main(["--out", str(tmp_path), "--base-url", server.url, "--api-url", f"{server.url}/api",
                     "--only", "Lung_Mask.zip"])
    finally:
        server.close()
    assert code == 1
    assert "Lung_Mask.zip: md5 mismatch: expected " + "0" * 32 in capsys.readouterr().err
    assert not (tmp_path / "Lung_Mask.zip").exists() and not (tmp_path / "Lung_Mask").exists()


def test_a_file_put_in_place_by_hand_is_verified_not_fetched(server, tmp_path):
    (tmp_path / "data.bin").write_bytes(PAYLOAD)
    pinned = remote(server, "data.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    download_file(pinned, tmp_path, log=lambda _: None)
    assert server.requests == []
    assert json.loads((tmp_path / "checksums.json").read_text(encoding="utf-8"))["data.bin"]["verified_against"] == ["sha256"]
    (tmp_path / "other.bin").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="other.bin: md5 mismatch.*delete it"):
        download_file(remote(server, "other.bin", md5="0" * 32), tmp_path, log=lambda _: None)
    assert (tmp_path / "other.bin").exists(), "a file the user placed is never deleted"
