#!/usr/bin/env python
"""The real lungmask (Hofmanninger et al. 2020, ``pip install lungmask``) on one CT, in its own process,
the way its users run it: import, ``LMInferer`` with the R231 U-Net, read the scan, ``LMInferer.apply``,
write the mask. Prints one JSON line of seconds since this process started, per step.

Its trained weights are a download this build cannot make, so ``--make-weights`` writes an R231 U-Net
with random weights (seeded; same architecture and size as lungmask's ``get_model`` builds) to a file,
which ``LMInferer(modelpath=...)`` loads. The network costs the same with any weights; its
post-processing (connected components, hole filling) sees random predictions instead of lungs.

    python benchmarks/run_lungmask.py --make-weights r231-random.pth
    python benchmarks/run_lungmask.py scan.nii.gz r231-random.pth out.nii.gz [--device cpu|cuda]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402


def make_weights(path: str) -> None:
    """lungmask's R231 network (``get_model``'s arguments, 3 classes), random weights, as a state dict."""
    import torch
    from lungmask.resunet import UNet

    torch.manual_seed(0)
    model = UNet(n_classes=3, padding=True, depth=5, up_mode="upsample", batch_norm=True, residual=False)
    torch.save(model.state_dict(), path)
    print(json.dumps({"weights": path, "parameters": sum(p.numel() for p in model.parameters())}))


def run(scan: str, weights: str, output: str, device: str) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from lungmask import LMInferer

    imported = time.perf_counter()
    threads = torch.get_num_threads()
    inferer = LMInferer(modelpath=weights, force_cpu=device == "cpu", tqdm_disable=True)
    loaded = time.perf_counter()
    image = sitk.ReadImage(scan)
    read = time.perf_counter()
    mask = inferer.apply(image)
    applied = time.perf_counter()
    result = sitk.GetImageFromArray(mask)
    result.CopyInformation(image)
    sitk.WriteImage(result, output, useCompression=True)
    written = time.perf_counter()
    print(json.dumps({
        "imported": imported - STARTED, "model_loaded": loaded - STARTED, "read": read - STARTED,
        "applied": applied - STARTED, "written": written - STARTED, "apply_seconds": applied - read,
        "device": str(inferer.device), "threads": threads, "slices": int(mask.shape[0]),
        "lung_fraction": float(np.count_nonzero(mask)) / mask.size,
    }))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make-weights", metavar="PATH", help="write random R231 weights to PATH and stop")
    parser.add_argument("scan", nargs="?")
    parser.add_argument("weights", nargs="?")
    parser.add_argument("output", nargs="?")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.make_weights:
        make_weights(args.make_weights)
        return 0
    if not (args.scan and args.weights and args.output):
        parser.error("give SCAN WEIGHTS OUTPUT, or --make-weights PATH")
    run(args.scan, args.weights, args.output, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
