"""Batched slice inference with the real tiny TorchScript model: classes on the slice grid, progress,
cancel, device choice, batch halving on CUDA out-of-memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from phantoms import chest_phantom
from torch import nn

from CovidInfectionSegLib.inference import (
    CPU_BATCH_SIZE,
    SegmentationCancelled,
    auto_batch_size,
    pick_device,
    predict_volume,
)
from CovidInfectionSegLib.model_package import ModelPackage, load_model_package


@pytest.fixture(scope="module")
def tiny_model(tiny_model_manifest: Path) -> ModelPackage:
    return load_model_package(tiny_model_manifest)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"device 'cuda' requested but CUDA is not available"):
        pick_device("cuda")


def test_auto_batch_size_on_cpu_is_modest() -> None:
    assert auto_batch_size(torch.device("cpu"), 256) == CPU_BATCH_SIZE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_batch_size_on_cuda_fits_free_memory() -> None:
    batch = auto_batch_size(torch.device("cuda"), 256)
    assert 1 <= batch <= 64


def test_predict_volume_finds_the_phantom_lungs(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom()
    classes = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=5)
    assert classes.dtype == np.uint8 and classes.shape == phantom.volume.shape
    lungs = phantom.right_lung | phantom.left_lung
    np.testing.assert_array_equal(classes == 1, lungs)


def test_non_square_slices_are_restored_to_their_grid(tiny_model: ModelPackage) -> None:
    # 40 rows x 64 columns: padded to 64 x 64 for the network, cropped back afterwards
    phantom = chest_phantom(shape=(8, 40, 64))
    classes = predict_volume(phantom.volume, tiny_model, "cpu")
    assert classes.shape == (8, 40, 64)
    lungs = phantom.right_lung | phantom.left_lung
    agreement = np.count_nonzero((classes == 1) == lungs) / lungs.size
    assert agreement > 0.99


def test_batch_size_does_not_change_the_result(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom(shape=(9, 48, 48))
    one = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=1)
    several = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=4)
    np.testing.assert_array_equal(one, several)


def test_progress_reports_every_batch(tiny_model: ModelPackage) -> None:
    seen: list[tuple[int, int]] = []
    predict_volume(
        chest_phantom(shape=(10, 32, 32)).volume,
        tiny_model,
        "cpu",
        batch_size=4,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(4, 10), (8, 10), (10, 10)]


def test_cancel_callable_after_first_batch(tiny_model: ModelPackage) -> None:
    seen: list[int] = []
    with pytest.raises(SegmentationCancelled, match="after 3 of 12 slices"):
        predict_volume(
            chest_phantom(shape=(12, 32, 32)).volume,
            tiny_model,
            "cpu",
            batch_size=3,
            progress=lambda done, total: seen.append(done),
            cancel=lambda: len(seen) >= 1,
        )
    assert seen == [3]


def test_cancel_event_after_first_batch(tiny_model: ModelPackage) -> None:
    event = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        event.set()

    with pytest.raises(SegmentationCancelled):
        predict_volume(
            chest_phantom(shape=(12, 32, 32)).volume, tiny_model, "cpu", batch_size=4, progress=progress, cancel=event
        )
    assert seen == [4]


class OutOfMemoryAboveBatch(nn.Module):
    """Runs the real tiny network, but raises CUDA out-of-memory for batches above ``limit`` (as a GPU would)."""

    def __init__(self, network: torch.jit.ScriptModule, limit: int):
        super().__init__()
        self.network = network
        self.limit = limit
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.network(x)


def with_module(model: ModelPackage, module: nn.Module) -> ModelPackage:
    return ModelPackage(model.manifest, module, model.manifest_path, model.recipe, model.labels, model.segments)


def test_out_of_memory_halves_the_batch_and_goes_on(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom(shape=(10, 32, 32))
    expected = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=8)
    module = OutOfMemoryAboveBatch(tiny_model.module, limit=2)
    classes = predict_volume(phantom.volume, with_module(tiny_model, module), "cpu", batch_size=8)
    np.testing.assert_array_equal(classes, expected)
    assert module.batch_sizes[:3] == [8, 4, 2]  # halved twice, then kept small
    assert max(module.batch_sizes[3:]) == 2


def test_out_of_memory_at_batch_one_fails_clearly(tiny_model: ModelPackage) -> None:
    module = OutOfMemoryAboveBatch(tiny_model.module, limit=0)
    with pytest.raises(RuntimeError, match="out of GPU memory .* even with batch size 1"):
        predict_volume(chest_phantom(shape=(8, 32, 32)).volume, with_module(tiny_model, module), "cpu", batch_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom(shape=(8, 48, 48))
    cpu = predict_volume(phantom.volume, tiny_model, "cpu")
    gpu = predict_volume(phantom.volume, tiny_model, "cuda")
    tiny_model.module.to("cpu")
    assert np.count_nonzero(cpu != gpu) / cpu.size < 0.001  # fp16 autocast may flip boundary pixels
