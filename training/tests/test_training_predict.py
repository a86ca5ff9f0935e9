"""predict: the training side's inference must give what the engine gives users, flip averaging included."""

from __future__ import annotations

import numpy as np
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
