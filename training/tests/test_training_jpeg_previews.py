"""``jpeg_previews``: the whole-scan previews' JPEG copies, into a folder that need not exist yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from covidseg_training.jpeg_previews import write_jpeg_copies

TRAINING = Path(__file__).parents[1]


def write_png(path: Path) -> np.ndarray:
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:40] = (0, 200, 255)
    assert cv2.imwrite(str(path), image)
    return image


def test_the_jpegs_go_into_a_new_folder_and_look_like_their_pngs(tmp_path):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    image = write_png(pngs / "scan-a.png")
    write_png(pngs / "scan-b.png")
    (pngs / "table.csv").write_text("not a preview\n")
    out = tmp_path / "results" / "wholescan_vX"  # two levels that do not exist yet
    done = subprocess.run([sys.executable, "-m", "covidseg_training.jpeg_previews", str(pngs), str(out)],
                          cwd=TRAINING, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in out.iterdir()) == ["scan-a.jpg", "scan-b.jpg"]
    copy = cv2.imread(str(out / "scan-a.jpg"))
    assert copy.shape == image.shape and np.abs(copy.astype(int) - image).mean() < 3


def test_an_unreadable_png_is_an_error_not_a_missing_jpeg(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png: not a readable PNG"):
        write_jpeg_copies(tmp_path, tmp_path / "out")
