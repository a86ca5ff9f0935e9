"""Batched slice-by-slice inference of the 2D network over a canonical CT volume.

Memory stays bounded by the batch: logits exist only for the batch in flight (upsampled and reduced
to class indices on the device), and the volume's result is one uint8 array. On CUDA out-of-memory
the batch is halved and the same slices retried. A ``cancel`` callable or ``threading.Event`` is
checked between batches. The next batch is preprocessed in a worker thread while the current one
runs (OpenCV releases the GIL).

Speed (see ARCHITECTURE.md, "Speed"): the precision is chosen at run time (:func:`pick_precision`);
the TorchScript network is frozen (constants folded, batch norm fused into the convolutions) and, for
fp32 on CPU, optimised for inference (oneDNN convolutions with pre-packed weights), once per module,
device and precision (:func:`prepare_module`). Only uint8 images cross to the device. On CUDA the
host side is pinned, copies are non-blocking and one batch stays in flight while the next is
launched, so the GPU does not wait for Python or for the preprocessing.

Flip test-time augmentation (``flip_tta``) runs each slice a second time mirrored left-right and
averages the two softmax maps (as nnU-Net mirrors): the network output is three classes (background,
lung, infection) with right and left decided later, so a mirrored slice needs no class swap. It costs
a second network pass per slice.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import threading
import warnings
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, ContextManager, Union

import numpy as np
import torch
import torch.nn.functional as F

from .model_package import ModelPackage
from .preprocessing import (IntensityRecipe, SliceGeometry, context_indices, make_clahe, preprocess_slice,
                            to_network_input)

ProgressCallback = Callable[[int, int], None]
CancelCheck = Union[Callable[[], bool], threading.Event]

# Measured with the bundled model (fp32, frozen and optimised, one thread): 87 ms per slice at batch 1
# or 2, 104 at 4, 129 at 8. Small batches keep a slice's feature maps in the cache.
CPU_BATCH_SIZE = 2
MAX_CUDA_BATCH_SIZE = 64
# Bytes of device memory one slice needs in flight, per input pixel: a 2D U-Net (base 16, depth 4)
# keeps roughly 100 float32 feature maps of the input size alive; rounded up for safety.
CUDA_BYTES_PER_INPUT_PIXEL = 512
CUDA_MEMORY_FRACTION = 0.5

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic that oneDNN uses for convolutions.
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


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


def cpu_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """This CPU's model name, for reports of where a figure was measured."""
    try:
        for line in Path(cpuinfo).read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when this CPU computes bf16 in hardware (x86 AVX-512 BF16 or AMX).

    Without it PyTorch emulates bf16 convolutions, about 100x slower than fp32 (measured on an AVX2
    AMD EPYC: 12 s instead of 0.09 s per slice). Asks PyTorch first, then the Linux CPU flags.
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool(flags & NATIVE_BF16_CPU_FLAGS)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether GPU ``device`` computes in bf16 natively (Ampere, compute capability 8, or newer; ROCm).
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4), where
    convolutions in bf16 leave cuDNN for a far slower path, and it asks about the current GPU."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def pick_precision(requested: str, device: torch.device) -> str:
    """The arithmetic to run the network in on ``device``: ``"fp32"``, ``"bf16"`` or ``"fp16"``.

    ``"auto"``: fp16 autocast on CUDA; on CPU bf16 autocast where the CPU has native bf16
    (:func:`cpu_has_native_bf16`), else fp32. An explicit choice is checked: ``"fp16"`` is CUDA only,
    ``"bf16"`` needs a GPU or CPU that supports it. Raises ``ValueError`` for an unknown name and
    ``RuntimeError`` for one this device cannot run well.
    """
    text = str(requested).lower()
    if text not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r}: use {', '.join(repr(p) for p in PRECISIONS)}")
    if device.type == "cuda":
        if text == "auto":
            return "fp16"
        if text == "bf16" and not cuda_has_native_bf16(device):
            raise RuntimeError(f"precision 'bf16' requested but {device} has no native bf16 (it needs compute "
                               "capability 8 or newer); use 'fp16' or 'fp32'")
        return text
    if text == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if text == "fp16":
        raise RuntimeError("precision 'fp16' is for CUDA only; on CPU use 'auto', 'fp32' or 'bf16'")
    if text == "bf16" and not cpu_has_native_bf16():
        raise RuntimeError(
            "precision 'bf16' requested but this CPU has no native bf16 (AVX-512 BF16 or AMX): emulated, it runs "
            "about 100x slower than fp32; use 'auto' or 'fp32'"
        )
    return text


def auto_batch_size(device: torch.device, input_size: int) -> int:
    """A batch size for ``device``: small on CPU (cache-friendly), from free memory on CUDA (at most 64)."""
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    free_bytes, _total = torch.cuda.mem_get_info(device)
    per_slice = CUDA_BYTES_PER_INPUT_PIXEL * input_size * input_size
    return int(max(1, min(MAX_CUDA_BATCH_SIZE, free_bytes * CUDA_MEMORY_FRACTION // per_slice)))


_PREPARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], torch.nn.Module]]" = (
    weakref.WeakKeyDictionary()
)
_PREPARED_LOCK = threading.Lock()


def prepare_module(module: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """``module`` ready to run on ``device`` in ``precision`` (a name :func:`pick_precision` returns).

    A TorchScript module is copied to the device and frozen; for fp32 on CPU it is also passed through
    ``torch.jit.optimize_for_inference`` (whose oneDNN convolutions ignore autocast, so bf16 uses the
    frozen module alone). The result is cached for the module's lifetime, so a Slicer session or a batch
    pays this once. A module that cannot be frozen (or one that is not TorchScript) runs as it is.
    """
    key = (str(device), precision)
    with _PREPARED_LOCK:
        cached = _PREPARED.get(module, {}).get(key)
        if cached is not None:
            return cached
        prepared = _optimised(module, device, precision)
        _PREPARED.setdefault(module, {})[key] = prepared
        return prepared


def _optimised(module: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    if not isinstance(module, torch.jit.ScriptModule):
        return module.to(device)
    placed = module if device.type == "cpu" else copy.deepcopy(module).to(device)  # freezing copies anyway
    if placed.training:
        return placed  # freezing needs eval mode; a module in training mode is used as it is
    with warnings.catch_warnings():
        # deprecated in favour of torch.compile, but TorchScript is the package format Slicer can run
        warnings.simplefilter("ignore", DeprecationWarning)
        frozen = torch.jit.freeze(placed)
        if device.type == "cpu" and precision == "fp32":
            return torch.jit.optimize_for_inference(frozen)
    return frozen


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
    precision: str = "auto",
    flip_tta: bool = False,
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """Network classes for every axial slice of a canonical volume.

    ``volume`` is (z, y, x), HU or any scalar, any numeric dtype (slices are converted one by one);
    returns uint8 (z, y, x) with the network's label values. ``precision`` is ``"auto"``, ``"fp32"``,
    ``"bf16"`` or ``"fp16"`` (see :func:`pick_precision`). ``flip_tta`` averages each slice's softmax
    with that of its left-right mirror (twice the network time). ``progress(done, total)`` is called
    after each batch; ``cancel`` is checked before each batch and raises :class:`SegmentationCancelled`.
    ``slice_spacing_mm``, the distance between slices, places the neighbours of a model with context
    across slices (``recipe.context_slices``); without it they are the adjacent slices.
    """
    if volume.ndim != 3:
        raise ValueError(f"predict_volume needs a (z, y, x) volume, got shape {volume.shape}")
    device = pick_device(device)
    precision = pick_precision(precision, device)
    total = volume.shape[0]
    batch_size = int(batch_size) if batch_size else auto_batch_size(device, model.input_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    geometry = SliceGeometry.for_shape(volume.shape[1:], model.recipe.pad_to_square)
    network = _Network(prepare_module(model.module, device, precision), geometry, device, precision, flip_tta)
    output = np.zeros(volume.shape, dtype=np.uint8)
    preparer = _BatchPreparer(volume, model.recipe, slice_spacing_mm)
    # CPU work is done when the call returns; CUDA work is queued, so one batch may stay in flight.
    max_in_flight = 1 if device.type == "cuda" else 0
    in_flight: deque[tuple[int, _BatchResult]] = deque()
    done = 0

    def finish_oldest() -> None:
        nonlocal done
        start, result = in_flight.popleft()
        classes = result.numpy()
        output[start : start + len(classes)] = classes
        done = start + len(classes)
        if progress is not None:
            progress(done, total)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="covidseg-preprocess") as pool:
        start = 0
        pending = pool.submit(preparer.prepare, start, min(total, start + batch_size))
        while start < total:
            if is_cancelled(cancel):
                pending.cancel()
                raise SegmentationCancelled(f"cancelled after {done} of {total} slices")
            images = pending.result()
            stop = start + len(images)
            if stop < total:
                pending = pool.submit(preparer.prepare, stop, min(total, stop + batch_size))
            for offset, result in network.launch_with_oom_halving(images, batch_size):
                in_flight.append((start + offset, result))
            batch_size = network.batch_size
            while len(in_flight) > max_in_flight:
                finish_oldest()
            start = stop
        while in_flight:
            finish_oldest()
    return output


class _BatchPreparer:
    """Preprocess slices [start, stop) of a volume: (n, size, size) uint8, or with context across
    slices (n, channels, size, size). Each slice is preprocessed once: the slices a batch shares with
    the one before are kept from it (batches are prepared in order). One CLAHE object per thread (it
    is not thread-safe)."""

    def __init__(self, volume: np.ndarray, recipe: IntensityRecipe, slice_spacing_mm: float | None = None):
        self.volume = volume
        self.recipe = recipe
        self.channels = context_indices(len(volume), recipe, slice_spacing_mm)
        self._local = threading.local()

    def prepare(self, start: int, stop: int) -> np.ndarray:
        if not hasattr(self._local, "clahe"):
            self._local.clahe = make_clahe(self.recipe)
        needed = self.channels[start:stop]
        previous = getattr(self._local, "prepared", {})
        prepared = {int(index): previous[int(index)] if int(index) in previous
                    else preprocess_slice(self.volume[index], self.recipe, self._local.clahe)
                    for index in np.unique(needed)}
        self._local.prepared = prepared
        size = self.recipe.input_size
        images = np.empty((*needed.shape, size, size), dtype=np.uint8)
        for position, indices in enumerate(needed):
            for channel, index in enumerate(indices):
                images[position, channel] = prepared[int(index)]
        return images[:, 0] if needed.shape[1] == 1 else images


class _BatchResult:
    """The classes of one batch: ready on CPU; on CUDA a non-blocking copy into pinned memory and an
    event to wait for before reading it."""

    def __init__(self, classes: torch.Tensor):
        self._ready: torch.cuda.Event | None = None
        if classes.device.type == "cuda":
            host = torch.empty(classes.shape, dtype=classes.dtype, pin_memory=True)
            host.copy_(classes, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(classes.device))
            classes = host
        self._classes = classes

    def numpy(self) -> np.ndarray:
        if self._ready is not None:
            self._ready.synchronize()
        return self._classes.numpy()


def _is_gpu_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is CUDA out-of-memory. The network is TorchScript, whose interpreter re-raises
    an operation's OutOfMemoryError as a plain RuntimeError that keeps only the message."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "CUDA out of memory" in str(error))


class _Network:
    """The prepared network for one volume's slice geometry; remembers the batch size OOM halving left."""

    def __init__(self, module: torch.nn.Module, geometry: SliceGeometry, device: torch.device, precision: str,
                 flip_tta: bool = False):
        self.module = module
        self.geometry = geometry
        self.device = device
        self.precision = precision
        self.flip_tta = flip_tta
        self.batch_size = 0

    def launch_with_oom_halving(self, images: np.ndarray, batch_size: int) -> list[tuple[int, _BatchResult]]:
        """Launch ``images`` in chunks of ``batch_size``, halving it on CUDA out-of-memory; returns
        (offset in ``images``, result) per chunk and leaves the batch size in use in ``self.batch_size``."""
        results = []
        index = 0
        while index < len(images):
            chunk = images[index : index + batch_size]
            try:
                classes = classify(self.module, chunk, self.geometry, self.device, self.precision, self.flip_tta)
                results.append((index, _BatchResult(classes)))
            except RuntimeError as error:
                if not _is_gpu_out_of_memory(error):
                    raise
                if batch_size == 1:
                    raise RuntimeError(
                        f"out of GPU memory on {self.device} even with batch size 1; use device 'cpu' or free GPU memory"
                    ) from error
                batch_size = max(1, batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            index += len(chunk)
        self.batch_size = batch_size
        return results


def predict_slices(
    module: torch.nn.Module,
    images: np.ndarray,
    geometry: SliceGeometry,
    device: torch.device,
    precision: str = "fp32",
    flip_tta: bool = False,
) -> np.ndarray:
    """Preprocessed uint8 images (n, size, size), or stacks (n, channels, size, size) for a model with
    context across slices -> uint8 classes (n, rows, cols) on the slice grid.

    ``module`` runs as given (pass it through :func:`prepare_module` for speed); ``precision`` is a
    name :func:`pick_precision` returns. Logits (with ``flip_tta``, the mean softmax of the slice and
    its left-right mirror) are upsampled bilinearly (on the device) to the padded square, reduced by
    argmax and cropped, the inverse of :func:`preprocessing.preprocess_slice`'s padding and resize.
    """
    return _BatchResult(classify(module, images, geometry, device, precision, flip_tta)).numpy()


def classify(
    module: torch.nn.Module, images: np.ndarray, geometry: SliceGeometry, device: torch.device, precision: str,
    flip_tta: bool = False,
) -> torch.Tensor:
    """Like :func:`predict_slices`, but returns the uint8 classes as a tensor on ``device`` (on CUDA
    possibly still being computed)."""
    pixels = torch.from_numpy(images)
    if device.type == "cuda":
        pixels = pixels.pin_memory().to(device, non_blocking=True)
    with torch.inference_mode():
        batch = _network_input_table(device)[pixels.long()]
        if batch.dim() == 3:  # single slices, no context: one channel
            batch = batch.unsqueeze(1)
        with autocast(device, precision):
            logits = flip_averaged_softmax(module, batch) if flip_tta else module(batch)
        target = _target_shape(geometry)
        if tuple(logits.shape[-2:]) != target:
            logits = F.interpolate(logits.float(), size=target, mode="bilinear", align_corners=False)
        # max(dim).indices is argmax (first index on ties) but 10x faster on CPU for a channel axis
        classes = logits.max(dim=1).indices.to(torch.uint8)
    if geometry.padded_size:
        top, left = geometry.pad_before
        rows, cols = geometry.shape
        classes = classes[:, top : top + rows, left : left + cols]
    return classes


def flip_averaged_softmax(module: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Flip test-time augmentation: the mean of the softmax of ``batch`` (N, C, H, W) and of its
    left-right mirror, mirrored back (float32, N x classes x H x W); any number of input channels."""
    mirrored = module(batch.flip(-1)).flip(-1)
    return (module(batch).float().softmax(dim=1) + mirrored.float().softmax(dim=1)) / 2


def autocast(device: torch.device, precision: str) -> ContextManager[object]:
    """Autocast to ``precision``'s dtype on ``device``, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


_INPUT_TABLES: dict[str, torch.Tensor] = {}


def _network_input_table(device: torch.device) -> torch.Tensor:
    """The network input for each of the 256 pixel values (:func:`preprocessing.to_network_input`),
    on ``device``: only uint8 pixels cross to the device, and the values are exactly the contract's."""
    key = str(device)
    if key not in _INPUT_TABLES:
        values = to_network_input(np.arange(256, dtype=np.uint8).reshape(1, 1, 256)).reshape(256)
        _INPUT_TABLES[key] = torch.from_numpy(values).to(device)
    return _INPUT_TABLES[key]


def _target_shape(geometry: SliceGeometry) -> tuple[int, int]:
    """Shape the network output is resized to before cropping (see ``preprocessing.restore_slice_shape``)."""
    if geometry.padded_size:
        return (geometry.padded_size, geometry.padded_size)
    return geometry.shape
