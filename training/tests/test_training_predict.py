"""predict: the training side's inference must give what the engine gives users, flip averaging included."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from CovidInfectionSegLib.inference import predict_slices
from CovidInfectionSegLib.model_package import default_model_path, load_model_package
from CovidInfectionSegLib.preprocessing import SliceGeometry, preprocess_slices
from CovidInfectionSegLib.sample_data import synthetic_chest
from covidseg_training.predict import FlipAveraged, predict


def test_flip_averaged_network_classifies_as_the_engine_with_flip_tta() -> None:
    # evaluate --flip-tta must measure what covidseg segment --flip-tta gives users
    package = load_model_package(default_model_path())
    volume = sitk.GetArrayFromImage(synthetic_chest(size=(256, 256, 24))).astype(np.float32)
    images = preprocess_slices(volume[8:12], package.recipe)
    images[:, :, :100] = np.clip(images[:, :, :100].astype(int) + 40, 0, 255).astype(np.uint8)  # not symmetric
    geometry = SliceGeometry.for_shape(images.shape[1:], pad_to_square=True)
    engine = predict_slices(package.module, images, geometry, torch.device("cpu"), flip_tta=True)
    flipped = predict(FlipAveraged(package.module), images)
    plain = predict(package.module, images)
    assert np.count_nonzero(engine) > 0.05 * engine.size and np.count_nonzero(plain.labels != engine) > 0
    assert np.count_nonzero(flipped.labels != engine) <= 1e-4 * engine.size
    assert flipped.infection_probability.max() <= 1.0


def test_predict_on_a_named_device_runs_float32_and_leaves_the_tf32_switches_as_they_were() -> None:
    # crossval evaluates on the training device; on a GPU TensorFloat-32 must be off for that (float32 as on
    # the CPU) and back as it was afterwards, also when the network fails
    package = load_model_package(default_model_path())
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    seen = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            seen.append((x.device.type, x.dtype, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return package.module(x)

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        on_cpu = predict(Recording(), images, batch_size=2, device="cpu")
        assert seen == [("cpu", torch.float32, False, False)] * 2
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
        default = predict(package.module, images, batch_size=2)
        assert np.array_equal(on_cpu.labels, default.labels)

        class Failing(torch.nn.Module):
            def forward(self, x):
                raise RuntimeError("out of memory")

        with pytest.raises(RuntimeError, match="out of memory"):
            predict(Failing(), images)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
