"""Batched slice inference with the real tiny TorchScript model: classes on the slice grid, progress,
cancel, device and precision choice, the frozen network, batch halving on CUDA out-of-memory."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from phantoms import chest_phantom
from torch import nn

from CovidInfectionSegLib.inference import (
    CPU_BATCH_SIZE,
    SegmentationCancelled,
    _network_input_table,
    auto_batch_size,
    cpu_has_native_bf16,
    pick_device,
    pick_precision,
    predict_slices,
    predict_volume,
    prepare_module,
)
from CovidInfectionSegLib.model_package import ModelPackage, default_model_path, load_model_package
from CovidInfectionSegLib.preprocessing import SliceGeometry, preprocess_slices, to_network_input
from CovidInfectionSegLib.sample_data import synthetic_chest

CPU = torch.device("cpu")
NATIVE_BF16 = cpu_has_native_bf16()


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


OUT_OF_MEMORY_BATCH_SIZES: list[int] = []


@torch.library.custom_op("covidseg_test::out_of_memory_above", mutates_args=())
def _out_of_memory_above(x: torch.Tensor, limit: int) -> torch.Tensor:
    """An operation that fails as CUDA's allocator does for batches above ``limit``."""
    OUT_OF_MEMORY_BATCH_SIZES.append(x.shape[0])
    if x.shape[0] > limit:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return x.clone()


class ScriptedOutOfMemoryAboveBatch(nn.Module):
    """The same inside TorchScript (as the bundled network runs): the interpreter turns the operation's
    OutOfMemoryError into a plain RuntimeError."""

    def __init__(self, network: torch.jit.ScriptModule, limit: int):
        super().__init__()
        self.network = network
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(torch.ops.covidseg_test.out_of_memory_above(x, self.limit))


def out_of_memory_above(kind: str, network: torch.jit.ScriptModule, limit: int) -> tuple[nn.Module, list[int]]:
    """(a network that runs out of memory above ``limit`` slices, the batch sizes it is given)."""
    if kind == "eager":
        module = OutOfMemoryAboveBatch(network, limit)
        return module, module.batch_sizes
    OUT_OF_MEMORY_BATCH_SIZES.clear()
    return torch.jit.script(ScriptedOutOfMemoryAboveBatch(network, limit)), OUT_OF_MEMORY_BATCH_SIZES


def with_module(model: ModelPackage, module: nn.Module) -> ModelPackage:
    return ModelPackage(model.manifest, module, model.manifest_path, model.recipe, model.labels, model.segments)


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_out_of_memory_halves_the_batch_and_goes_on(tiny_model: ModelPackage, kind: str) -> None:
    phantom = chest_phantom(shape=(10, 32, 32))
    expected = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=8)
    module, batch_sizes = out_of_memory_above(kind, tiny_model.module, limit=2)
    classes = predict_volume(phantom.volume, with_module(tiny_model, module), "cpu", batch_size=8)
    np.testing.assert_array_equal(classes, expected)
    assert batch_sizes[:3] == [8, 4, 2]  # halved twice, then kept small
    assert max(batch_sizes[3:]) == 2


@pytest.mark.parametrize("kind", ["eager", "torchscript"])
def test_out_of_memory_at_batch_one_fails_clearly(tiny_model: ModelPackage, kind: str) -> None:
    module, _ = out_of_memory_above(kind, tiny_model.module, limit=0)
    with pytest.raises(RuntimeError, match="out of GPU memory .* even with batch size 1"):
        predict_volume(chest_phantom(shape=(8, 32, 32)).volume, with_module(tiny_model, module), "cpu", batch_size=2)


# ------------------------------------------------------------------------------------- precision


def test_precision_choice_on_cpu() -> None:
    assert pick_precision("fp32", CPU) == "fp32"
    assert pick_precision("AUTO", CPU) == ("bf16" if NATIVE_BF16 else "fp32")
    with pytest.raises(RuntimeError, match="'fp16' is for CUDA only"):
        pick_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        pick_precision("int8", CPU)


@pytest.mark.skipif(NATIVE_BF16, reason="checks the refusal on a CPU without native bf16")
def test_bf16_on_a_cpu_without_native_bf16_is_refused() -> None:
    with pytest.raises(RuntimeError, match="no native bf16 .* about 100x slower"):
        pick_precision("bf16", CPU)


@pytest.mark.parametrize("major, native", [(7, False), (8, True), (9, True)])
def test_bf16_on_a_gpu_only_where_it_is_native(monkeypatch, major: int, native: bool) -> None:
    """No GPU here: the device's compute capability is faked (V100/T4 are 7, A100 8, H100/H200 9).
    torch.cuda.is_bf16_supported() says yes on 7 too, where bf16 is only emulated."""
    from types import SimpleNamespace

    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: asked.append(device) or SimpleNamespace(major=major))
    gpu = torch.device("cuda:1")
    assert pick_precision("auto", gpu) == "fp16"
    if native:
        assert pick_precision("bf16", gpu) == "bf16"
    else:
        with pytest.raises(RuntimeError, match="cuda:1 has no native bf16"):
            pick_precision("bf16", gpu)
    assert asked == [gpu], "the GPU asked for, not the current one"


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\n")
    without = tmp_path / "avx2"
    without.write_text("processor : 0\nflags\t\t: fpu sse2 avx2 fma\n\n")
    assert cpu_has_native_bf16(with_bf16)
    # PyTorch's own probe answers first, so only a CPU without native bf16 reads the file's "no"
    assert cpu_has_native_bf16(without) == NATIVE_BF16
    assert cpu_has_native_bf16(tmp_path / "missing") == NATIVE_BF16


def test_the_network_is_frozen_once_per_device_and_precision(tiny_model: ModelPackage) -> None:
    prepared = prepare_module(tiny_model.module, CPU, "fp32")
    assert prepared is prepare_module(tiny_model.module, CPU, "fp32")
    assert prepared is not tiny_model.module
    assert list(prepared.parameters()) == []  # weights folded into the graph as constants
    assert list(tiny_model.module.parameters())  # the package's own module is left as it was


def test_a_module_in_training_mode_or_not_torchscript_runs_as_it_is(tiny_model: ModelPackage) -> None:
    training = torch.jit.script(nn.Conv2d(1, 3, 1)).train()
    assert prepare_module(training, CPU, "fp32") is training
    eager = nn.Conv2d(1, 3, 1).eval()
    assert prepare_module(eager, CPU, "fp32") is eager


def test_the_network_input_is_the_contract_for_every_pixel_value() -> None:
    values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    expected = to_network_input(values).ravel()
    np.testing.assert_array_equal(_network_input_table(CPU).numpy(), expected)


class TiedLogits(nn.Module):
    """Background 0, lung and infection tied at 1 everywhere: argmax must pick the first, lung."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.ones(x.shape[0], 3, x.shape[2], x.shape[3])
        logits[:, 0] = 0.0
        return logits


def test_ties_go_to_the_first_class() -> None:
    geometry = SliceGeometry.for_shape((20, 32), pad_to_square=True)
    classes = predict_slices(torch.jit.script(TiedLogits()), np.zeros((3, 32, 32), np.uint8), geometry, CPU)
    assert classes.shape == (3, 20, 32)
    assert np.all(classes == 1)


@pytest.fixture(scope="module")
def bundled_model() -> ModelPackage:
    return load_model_package(default_model_path())


def test_frozen_and_optimised_bundled_model_gives_the_same_classes(bundled_model: ModelPackage) -> None:
    chest = synthetic_chest(size=(256, 256, 24))
    volume = sitk.GetArrayFromImage(chest).astype(np.float32)
    images = preprocess_slices(volume[8:12], bundled_model.recipe)
    geometry = SliceGeometry.for_shape(volume.shape[1:], True)
    plain = predict_slices(bundled_model.module, images, geometry, CPU)
    fast = predict_slices(prepare_module(bundled_model.module, CPU, "fp32"), images, geometry, CPU)
    assert np.count_nonzero(plain) > 0.05 * plain.size  # the model found lung: a meaningful comparison
    assert np.count_nonzero(plain != fast) <= 1e-4 * plain.size
    batch = torch.from_numpy(to_network_input(images))
    with torch.inference_mode():
        torch.testing.assert_close(prepare_module(bundled_model.module, CPU, "fp32")(batch),
                                   bundled_model.module(batch), atol=1e-3, rtol=1e-4)


class SidedLogits(nn.Module):
    """Ignores its input: infection, confidently, on the left half of the image; lung, weakly, on the right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 3, x.shape[2], x.shape[3])
        half = x.shape[3] // 2
        logits[:, 2, :, :half] = 5.0
        logits[:, 1, :, half:] = 1.0
        return logits


def test_flip_tta_averages_the_slice_with_its_mirror() -> None:
    # Mirrored and flipped back, the right half sees the confident infection of the left half:
    # softmax mean there is 0.60 infection against 0.29 lung. Forgetting to flip back would leave
    # each half as it was.
    geometry = SliceGeometry.for_shape((32, 32), pad_to_square=True)
    images = np.zeros((2, 32, 32), np.uint8)
    module = torch.jit.script(SidedLogits())
    plain = predict_slices(module, images, geometry, CPU)
    assert np.all(plain[:, :, :16] == 2) and np.all(plain[:, :, 16:] == 1)
    assert np.all(predict_slices(module, images, geometry, CPU, flip_tta=True) == 2)


def test_flip_tta_is_mirror_symmetric_with_the_bundled_model(bundled_model: ModelPackage) -> None:
    # With flip averaging, the result of a mirrored slice is the mirrored result.
    chest = synthetic_chest(size=(256, 256, 24))
    volume = sitk.GetArrayFromImage(chest).astype(np.float32)
    images = preprocess_slices(volume[8:12], bundled_model.recipe)
    images[:, :, :100] = np.clip(images[:, :, :100].astype(int) + 40, 0, 255).astype(np.uint8)  # break the symmetry
    geometry = SliceGeometry.for_shape(volume.shape[1:], True)
    module = prepare_module(bundled_model.module, CPU, "fp32")
    once = predict_slices(module, images, geometry, CPU, flip_tta=True)
    mirrored = predict_slices(module, np.ascontiguousarray(images[:, :, ::-1]), geometry, CPU, flip_tta=True)
    assert np.count_nonzero(once) > 0.05 * once.size
    assert np.count_nonzero(once != mirrored[:, :, ::-1]) <= 1e-4 * once.size
    plain = predict_slices(module, images, geometry, CPU)
    assert np.count_nonzero(plain != once) > 0  # the second pass changed something: not a no-op


def test_predict_volume_with_flip_tta_finds_the_phantom_lungs(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom()
    classes = predict_volume(phantom.volume, tiny_model, "cpu", batch_size=3, flip_tta=True)
    np.testing.assert_array_equal(classes == 1, phantom.right_lung | phantom.left_lung)


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")
def test_bf16_on_cpu_matches_fp32(tiny_model: ModelPackage) -> None:
    phantom = chest_phantom(shape=(8, 48, 48))
    fp32 = predict_volume(phantom.volume, tiny_model, "cpu", precision="fp32")
    bf16 = predict_volume(phantom.volume, tiny_model, "cpu", precision="bf16")
    assert np.count_nonzero(fp32 != bf16) / fp32.size < 0.001


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_precisions_match_cpu_and_report_every_batch(tiny_model: ModelPackage, precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    phantom = chest_phantom(shape=(11, 48, 48))
    cpu = predict_volume(phantom.volume, tiny_model, "cpu", precision="fp32")
    seen: list[tuple[int, int]] = []
    gpu = predict_volume(phantom.volume, tiny_model, "cuda", batch_size=3, precision=precision,
                         progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 11), (6, 11), (9, 11), (11, 11)]  # in order, though one batch is kept in flight
    assert np.count_nonzero(cpu != gpu) / cpu.size < 0.001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_leaves_the_package_module_on_the_cpu(tiny_model: ModelPackage) -> None:
    predict_volume(chest_phantom(shape=(4, 32, 32)).volume, tiny_model, "cuda")
    assert all(parameter.device.type == "cpu" for parameter in tiny_model.module.parameters())
