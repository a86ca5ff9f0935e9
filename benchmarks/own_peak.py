#!/usr/bin/env python
"""Run a Python module (``-m name``) or script in this process, then print this process's own peak
resident memory as one JSON line, ``{"own_peak_rss_mb": ...}``.

Why not the parent's ``wait4`` rusage: on Linux a child's ``ru_maxrss`` counts the memory it shared
with its parent when forked and keeps that high-water mark across ``exec``, so a benchmark process
holding a big volume reports its own size for every child it starts. ``VmHWM`` in
``/proc/self/status`` belongs to this process's memory map, which ``exec`` made new.

    python benchmarks/own_peak.py -m CovidInfectionSegLib.cli segment scan.nii.gz -o out
"""

from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
from pathlib import Path


def own_peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # no /proc: the rusage figure


def _report() -> None:
    sys.stdout.flush()
    print(json.dumps({"own_peak_rss_mb": round(own_peak_rss_mb(), 1)}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: own_peak.py -m MODULE [ARGS...] | own_peak.py SCRIPT [ARGS...]")
    atexit.register(_report)
    if sys.argv[1] == "-m":
        module, sys.argv = sys.argv[2], sys.argv[2:]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
