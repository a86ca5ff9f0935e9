"""Tiny stand-ins for the Zenodo 3757476 files: small chest-like NIfTI volumes with lung and infection
masks, named and zipped like the record (two cases in HU, two stored windowed to 0..255 like the
Radiopaedia volumes), the record's JSON listing with their MD5s, and a local HTTP server that serves
them with Range support.
"""

from __future__ import annotations

import hashlib
import json
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel
import numpy as np

SHAPE = (64, 64, 12)  # x, y, z
CASES = {  # image file name (the record's own, or the Kaggle copy's for one case) -> mask file name
    "coronacases_001.nii.gz": "coronacases_001.nii.gz",
    "coronacases_org_002.nii.gz": "coronacases_002.nii.gz",
    "radiopaedia_4_85506_1.nii.gz": "radiopaedia_4_85506_1.nii.gz",
    "radiopaedia_org_covid-19-pneumonia-7_85703_0-dcm.nii.gz": "radiopaedia_7_85703_0.nii.gz",
}
SLICE_WITHOUT_INFECTION = 5  # in every case: prepare must drop it


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU volume, lung mask with 1 = one lung and 2 = the other, infection mask), arrays indexed x, y, z."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]].astype(float)
    body = ((x - 32) / 29) ** 2 + ((y - 32) / 23) ** 2 <= 1
    lungs = np.zeros(SHAPE[:2], dtype=np.uint8)
    lungs[((x - 20) / 9) ** 2 + ((y - 32) / 15) ** 2 <= 1] = 1
    lungs[((x - 44) / 9) ** 2 + ((y - 32) / 15) ** 2 <= 1] = 2
    volume = np.full(SHAPE, -1024.0, dtype=np.float32)
    volume[:3, :3] = -2048.0  # scanner padding outside the field of view: the HU window must clip it
    lung_mask = np.zeros(SHAPE, dtype=np.uint8)
    infection = np.zeros(SHAPE, dtype=np.uint8)
    for z in range(SHAPE[2]):
        slab = np.where(body, 40.0, -1024.0) + rng.normal(0, 15, SHAPE[:2])
        slab[lungs > 0] = -860.0 + rng.normal(0, 25, int((lungs > 0).sum()))
        volume[3:, :, z] = slab[3:]
        volume[:3, 3:, z] = slab[:3, 3:]
        lung_mask[..., z] = lungs
        if z != SLICE_WITHOUT_INFECTION:
            cx, cy = (20 if z % 2 else 44) + rng.integers(-3, 4), 32 + rng.integers(-6, 7)
            blob = (((x - cx) / 4) ** 2 + ((y - cy) / 5) ** 2 <= 1) & (lungs > 0)
            volume[..., z][blob] = -300.0 + rng.normal(0, 30, int(blob.sum()))
            infection[..., z] = blob
    return volume, lung_mask, infection


def windowed_0_255(volume_hu: np.ndarray) -> np.ndarray:
    """How the Radiopaedia volumes are stored: window [-1250, 250] rescaled to 0..255."""
    return np.round(np.clip((volume_hu + 1250.0) / 1500.0, 0, 1) * 255.0).astype(np.float32)


def _save(array: np.ndarray, path: Path) -> None:
    # 1.5 mm pixels: each lung holds ~60 mL, above the engine's 20 mL minimum lung component
    nibabel.save(nibabel.Nifti1Image(array, np.diag([-1.5, -1.5, 5.0, 1.0])), str(path))


def write_record(folder: Path) -> dict[str, Path]:
    """Write the four archives of the record into ``folder``; returns {archive name: path}."""
    staging = folder / "staging"
    for sub in ("images", "lung", "infection", "combined"):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    for seed, (image_name, mask_name) in enumerate(CASES.items()):
        volume, lungs, infection = make_case(seed)
        _save(windowed_0_255(volume) if image_name.startswith("radiopaedia") else volume, staging / "images" / image_name)
        _save(lungs, staging / "lung" / mask_name)
        _save(infection, staging / "infection" / mask_name)
        _save(np.where(infection > 0, 3, lungs).astype(np.uint8), staging / "combined" / mask_name)
    archives = {}
    for name, sub in (("COVID-19-CT-Seg_20cases.zip", "images"), ("Lung_Mask.zip", "lung"),
                      ("Infection_Mask.zip", "infection"), ("Lung_and_Infection_Mask.zip", "combined")):
        archives[name] = folder / name
        with zipfile.ZipFile(archives[name], "w") as bundle:
            for file in sorted((staging / sub).iterdir()):
                bundle.write(file, file.name)
    return archives


def record_listing(archives: dict[str, Path], md5: dict[str, str] | None = None) -> bytes:
    """The record's JSON as Zenodo's REST API lists it (``files[].key``, ``checksum "md5:..."``), with the
    archives' true MD5s unless ``md5`` overrides them."""
    md5 = md5 or {}
    files = [{"key": name, "size": path.stat().st_size,
              "checksum": "md5:" + md5.get(name, hashlib.md5(path.read_bytes()).hexdigest())}
             for name, path in archives.items()]
    return json.dumps({"id": 3757476, "files": files}).encode()


@dataclass
class FileServer:
    """Serves ``files`` (name -> bytes) on 127.0.0.1 with HTTP Range; names in ``cut_once`` are cut off
    half way through the first time they are sent. ``requests`` logs (path, Range header)."""

    files: dict[str, bytes]
    cut_once: set[str] = field(default_factory=set)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:
                name = self.path.split("?")[0].lstrip("/")
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.cut_once:
                    server.cut_once.discard(name)
                    self.wfile.write(body[start : start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
