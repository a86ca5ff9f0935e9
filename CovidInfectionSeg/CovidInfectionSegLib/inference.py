"""Batched slice-by-slice inference of the 2D network over a canonical CT volume.

Memory stays bounded by the batch: logits exist only for the batch in flight (upsampled and reduced
to class indices on the device), and the volume's result is one uint8 array. On CUDA out-of-memory
the batch is halved and the same slices retried. A ``cancel`` callable or ``threading.Event`` is
checked between batches. The next batch is preprocessed in a worker thread while the current one
runs (OpenCV releases the GIL).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F

from .model_package import ModelPackage
from .preprocessing import IntensityRecipe, SliceGeometry, make_clahe, preprocess_slice, to_network_input

ProgressCallback = Callable[[int, int], None]
CancelCheck = Union[Callable[[], bool], threading.Event]

CPU_BATCH_SIZE = 4
MAX_CUDA_BATCH_SIZE = 64
# Bytes of device memory one slice needs in flight, per input pixel: a 2D U-Net (base 16, depth 4)
# keeps roughly 100 float32 feature maps of the input size alive; rounded up for safety.
CUDA_BYTES_PER_INPUT_PIXEL = 512
CUDA_MEMORY_FRACTION = 0.5


class SegmentationCancelled(Exception):
    """The caller asked to stop (``cancel`` returned True or its Event was set)."""


def pick_device(requested: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"``/``"cuda:N"`` must be available; ``"cpu"``."""
    text = str(requested).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise RuntimeError(
                f"device {requested!r} requested but CUDA is not available ({build}); use device 'cpu' or 'auto'"
            )
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return device
    if text == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device {requested!r}: use 'auto', 'cuda', 'cuda:N' or 'cpu'")


def auto_batch_size(device: torch.device, input_size: int) -> int:
    """A batch size for ``device``: modest on CPU, from free memory on CUDA (at most 64)."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free_bytes, _total = torch.cuda.mem_get_info(device)
    per_slice = CUDA_BYTES_PER_INPUT_PIXEL * input_size * input_size
    return int(max(1, min(MAX_CUDA_BATCH_SIZE, free_bytes * CUDA_MEMORY_FRACTION // per_slice)))


def is_cancelled(cancel: CancelCheck | None) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def predict_volume(
    volume: np.ndarray,
    model: ModelPackage,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> np.ndarray:
    """Network classes for every axial slice of a canonical volume.

    ``volume`` is (z, y, x) float32 (HU or any scalar); returns uint8 (z, y, x) with the network's
    label values. ``progress(done, total)`` is called after each batch; ``cancel`` is checked before
    each batch and raises :class:`SegmentationCancelled`.
    """
    if volume.ndim != 3:
        raise ValueError(f"predict_volume needs a (z, y, x) volume, got shape {volume.shape}")
    device = pick_device(device)
    total = volume.shape[0]
    batch_size = int(batch_size) if batch_size else auto_batch_size(device, model.input_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    geometry = SliceGeometry.for_shape(volume.shape[1:], model.recipe.pad_to_square)
    module = model.module.to(device)
    output = np.zeros(volume.shape, dtype=np.uint8)
    preparer = _BatchPreparer(volume, model.recipe)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidseg-preprocess") as pool:
        start = 0
        pending = pool.submit(preparer.prepare, start, min(total, start + batch_size))
        while start < total:
            if is_cancelled(cancel):
                pending.cancel()
                raise SegmentationCancelled(f"cancelled after {start} of {total} slices")
            images = pending.result()
            stop = start + len(images)
            if stop < total:
                pending = pool.submit(preparer.prepare, stop, min(total, stop + batch_size))
            output[start:stop], batch_size = _predict_with_oom_halving(module, images, geometry, device, batch_size)
            start = stop
            if progress is not None:
                progress(start, total)
    return output


class _BatchPreparer:
    """Preprocess slices [start, stop) of a volume; one CLAHE object per thread (it is not thread-safe)."""

    def __init__(self, volume: np.ndarray, recipe: IntensityRecipe):
        self.volume = volume
        self.recipe = recipe
        self._local = threading.local()

    def prepare(self, start: int, stop: int) -> np.ndarray:
        if not hasattr(self._local, "clahe"):
            self._local.clahe = make_clahe(self.recipe)
        images = np.empty((stop - start, self.recipe.input_size, self.recipe.input_size), dtype=np.uint8)
        for offset, index in enumerate(range(start, stop)):
            images[offset] = preprocess_slice(self.volume[index], self.recipe, self._local.clahe)
        return images


def _predict_with_oom_halving(
    module: torch.jit.ScriptModule, images: np.ndarray, geometry: SliceGeometry, device: torch.device, batch_size: int
) -> tuple[np.ndarray, int]:
    """Classes for ``images`` in chunks of ``batch_size``, halving on CUDA OOM; returns (classes, batch size now)."""
    results = []
    index = 0
    while index < len(images):
        chunk = images[index : index + batch_size]
        try:
            results.append(predict_slices(module, chunk, geometry, device))
        except torch.cuda.OutOfMemoryError as error:
            if batch_size == 1:
                raise RuntimeError(
                    f"out of GPU memory on {device} even with batch size 1; use device 'cpu' or free GPU memory"
                ) from error
            batch_size = max(1, batch_size // 2)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        index += len(chunk)
    return np.concatenate(results), batch_size


def predict_slices(
    module: torch.jit.ScriptModule, images: np.ndarray, geometry: SliceGeometry, device: torch.device
) -> np.ndarray:
    """Preprocessed uint8 images (n, size, size) -> uint8 classes (n, rows, cols) on the slice grid.

    Logits are upsampled bilinearly (on the device) to the padded square, reduced by argmax and cropped,
    the inverse of :func:`preprocessing.preprocess_slice`'s padding and resize.
    """
    batch = torch.from_numpy(to_network_input(images)).to(device)
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=device.type == "cuda"):
        logits = module(batch)
        target = _target_shape(geometry)
        if tuple(logits.shape[-2:]) != target:
            logits = F.interpolate(logits.float(), size=target, mode="bilinear", align_corners=False)
        classes = logits.argmax(dim=1).to(torch.uint8)
    if geometry.padded_size:
        top, left = geometry.pad_before
        rows, cols = geometry.shape
        classes = classes[:, top : top + rows, left : left + cols]
    return classes.cpu().numpy()


def _target_shape(geometry: SliceGeometry) -> tuple[int, int]:
    """Shape the network output is resized to before cropping (see ``preprocessing.restore_slice_shape``)."""
    if geometry.padded_size:
        return (geometry.padded_size, geometry.padded_size)
    return geometry.shape
