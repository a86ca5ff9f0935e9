"""Whole-volume work done a slab of slices at a time.

Each full-size temporary array (512 x 512 x 300 voxels: 79 MB as booleans, 630 MB as the 64-bit integers
``np.bincount`` converts labels to) costs its size in peak memory and, when first touched, time: 0.3-0.7 s
each on the project's 2-core development VM. Slabs of about ``SLAB_VOXELS`` keep the temporaries small,
and small ones are reused.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

SLAB_VOXELS = 1 << 20


def slabs(shape: tuple[int, ...]) -> Iterator[slice]:
    """Slices along the first axis of an array of ``shape``, each a slab of about ``SLAB_VOXELS`` (at least
    one slice)."""
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:]))))
    for start in range(0, shape[0], step):
        yield slice(start, min(start + step, shape[0]))
