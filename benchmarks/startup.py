#!/usr/bin/env python
"""Start-up cost of the engine, in its own process: import, load the model, read the scan, and run
``segment_image`` until the first batch of slices has come out of the network (then cancel). Prints one
JSON line with the wall-clock time (``time.time()``) of each step, so the caller can measure from the
moment it started this process.

    python benchmarks/startup.py scan.nii.gz [--device cpu] [--precision auto] [--batch-size N] [--model M]
"""

from __future__ import annotations

import time

MOMENTS = {"interpreter": time.time()}

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scan")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)

    from CovidInfectionSegLib.imageio import read_image
    from CovidInfectionSegLib.model_package import load_model_package
    from CovidInfectionSegLib.pipeline import SegmentationCancelled, segment_image

    MOMENTS["imported"] = time.time()
    model = load_model_package(args.model)
    MOMENTS["model_loaded"] = time.time()
    image = read_image(args.scan)
    MOMENTS["read"] = time.time()
    first_batch = threading.Event()

    def progress(done: int, total: int) -> None:
        if not first_batch.is_set():
            MOMENTS["first_batch"] = time.time()
            MOMENTS["first_batch_slices"] = done
            first_batch.set()

    try:
        segment_image(image, model, device=args.device, precision=args.precision, batch_size=args.batch_size,
                      progress=progress, cancel=first_batch)
    except SegmentationCancelled:
        pass
    print(json.dumps(MOMENTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
