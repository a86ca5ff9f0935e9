"""JPEG copies of a folder's PNG previews, the form in which whole-scan previews are committed (about 300 kB
each at quality 85; the PNGs are 2-3 MB). Used by training/gpu/after_v2.sh and training/cpu/fork_screen.sh.

    python -m covidseg_training.jpeg_previews PNG_FOLDER JPEG_FOLDER
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2

QUALITY = 85


def write_jpeg_copies(png_folder: Path, jpeg_folder: Path, quality: int = QUALITY) -> list[Path]:
    """Write ``<stem>.jpg`` into ``jpeg_folder`` (made if missing) for each ``*.png`` in ``png_folder``; returns
    the JPEGs. OpenCV reports a failed read or write only by its return value, so each is checked here."""
    written = []
    Path(jpeg_folder).mkdir(parents=True, exist_ok=True)
    for png in sorted(Path(png_folder).glob("*.png")):
        jpeg = Path(jpeg_folder) / f"{png.stem}.jpg"
        image = cv2.imread(str(png))
        if image is None:
            raise ValueError(f"{png}: not a readable PNG")
        if not cv2.imwrite(str(jpeg), image, [cv2.IMWRITE_JPEG_QUALITY, quality]):
            raise OSError(f"{jpeg}: could not be written")
        written.append(jpeg)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m covidseg_training.jpeg_previews", description=__doc__.split("\n")[0])
    parser.add_argument("png_folder", type=Path)
    parser.add_argument("jpeg_folder", type=Path)
    args = parser.parse_args(argv)
    write_jpeg_copies(args.png_folder, args.jpeg_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
