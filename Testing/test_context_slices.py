"""Context across slices (a 2.5D input): which slices a model with ``recipe.context_slices`` sees as
channels, through the real engine, and the manifest keys that say so."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_factory import ThresholdNet, write_model_package
from phantoms import chest_phantom
from torch import nn

from CovidInfectionSegLib.inference import predict_volume
from CovidInfectionSegLib.model_package import ModelError, load_model_package
from CovidInfectionSegLib.pipeline import segment_image
from CovidInfectionSegLib.preprocessing import IntensityRecipe, context_indices, context_step


class NeighbourNet(nn.Module):
    """Class 1 where the lower neighbour (channel 0) is bright, class 2 where the upper one (channel 2)
    is, background elsewhere: the output shows which slices the engine put in the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x[:, :1], 0.5), x[:, :1], x[:, 2:3]], dim=1)


class CentreOnly(nn.Module):
    """ThresholdNet on the middle channel: a context model that ignores the context."""

    def __init__(self):
        super().__init__()
        self.threshold = ThresholdNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.threshold(x[:, 1:2])


def marked_volume(slices: int = 9, size: int = 64) -> np.ndarray:
    """Slice k is dark with one bright 6-pixel square in column block k, so a square's place says
    which slice it came from."""
    volume = np.zeros((slices, size, size), dtype=np.float32)
    for k in range(slices):
        volume[k, 20:26, 6 * k + 2 : 6 * k + 8] = 1000.0
    return volume


def square_columns(mask: np.ndarray) -> set[int]:
    """The column blocks (slice numbers of marked_volume) whose square centre is set in a 2D mask."""
    return {k for k in range(mask.shape[1] // 6) if mask[23, 6 * k + 5]}


def test_context_step_is_the_nearest_slice_to_the_distance_and_at_least_one() -> None:
    recipe = IntensityRecipe(context_slices=1, context_mm=3.0)
    assert context_step(recipe, 2.5) == 1
    assert context_step(recipe, 1.0) == 3
    assert context_step(recipe, 0.625) == 5
    assert context_step(recipe, 5.0) == 1
    assert context_step(recipe, None) == 1
    assert context_step(IntensityRecipe(context_slices=1), 0.5) == 1  # no distance: adjacent slices


def test_context_indices_repeat_the_end_slices() -> None:
    recipe = IntensityRecipe(context_slices=2, context_mm=2.0)
    table = context_indices(5, recipe, 1.0)  # step 2
    assert table.tolist() == [[0, 0, 0, 2, 4], [0, 0, 1, 3, 4], [0, 0, 2, 4, 4], [0, 1, 3, 4, 4], [0, 2, 4, 4, 4]]
    assert context_indices(3, IntensityRecipe(), 1.0).tolist() == [[0], [1], [2]]


def test_recipe_manifest_keeps_single_slice_recipes_as_they_were() -> None:
    plain = IntensityRecipe().to_manifest()
    assert "context_slices" not in plain and "context_mm" not in plain
    assert IntensityRecipe.from_manifest(plain).channels == 1
    with_context = IntensityRecipe(context_slices=1, context_mm=3.0)
    stored = with_context.to_manifest()
    assert stored["context_slices"] == 1 and stored["context_mm"] == 3.0
    assert IntensityRecipe.from_manifest(stored) == with_context
    assert IntensityRecipe.from_manifest(stored).channels == 3
    with pytest.raises(ValueError, match="context_slices"):
        IntensityRecipe(context_slices=-1)


@pytest.mark.parametrize("spacing, step", [(None, 1), (2.5, 2)])
def test_predict_volume_feeds_the_neighbours_lowest_first(tmp_path: Path, spacing: float | None, step: int) -> None:
    recipe = IntensityRecipe(input_size=64, hu_window=None, context_slices=1, context_mm=5.0)
    package = load_model_package(write_model_package(tmp_path, NeighbourNet(), "neighbours", recipe))
    volume = marked_volume()
    classes = predict_volume(volume, package, "cpu", batch_size=2, slice_spacing_mm=spacing)
    last = len(volume) - 1
    for k in range(len(volume)):
        assert square_columns(classes[k] == 1) == {max(0, k - step)}, k
        assert square_columns(classes[k] == 2) == {min(last, k + step)}, k
    # batches of another size straddle other slices: the same channels
    assert np.array_equal(classes, predict_volume(volume, package, "cpu", batch_size=5, slice_spacing_mm=spacing))


def test_a_package_whose_network_takes_fewer_channels_than_its_recipe_is_refused(tmp_path: Path) -> None:
    recipe = IntensityRecipe(input_size=64, context_slices=1)
    manifest = write_model_package(tmp_path, ThresholdNet(), "one_channel", recipe)
    with pytest.raises(ModelError, match=r"failed with 3 input channel\(s\) \(recipe.context_slices 1\)"):
        load_model_package(manifest)


def test_segment_with_a_context_model_runs_the_whole_pipeline(tmp_path: Path) -> None:
    phantom = chest_phantom(shape=(12, 64, 64), spacing=(5.0, 5.0, 2.5), infection_in_right=True)
    image = sitk.GetImageFromArray(phantom.volume)
    image.SetSpacing(phantom.spacing)
    recipe = IntensityRecipe(input_size=64, context_slices=1, context_mm=3.0)
    single = load_model_package(write_model_package(tmp_path / "single", ThresholdNet(), "single",
                                                    IntensityRecipe(input_size=64)))
    context = load_model_package(write_model_package(tmp_path / "context", CentreOnly(), "context", recipe))
    expected = segment_image(image, single, device="cpu")
    result = segment_image(image, context, device="cpu")
    assert np.array_equal(sitk.GetArrayFromImage(result.labelmap), sitk.GetArrayFromImage(expected.labelmap))
    assert result.measurements.total.infection_ml == expected.measurements.total.infection_ml > 0
