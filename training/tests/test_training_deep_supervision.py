"""Deep supervision: auxiliary heads trained on subsampled labels, absent from what is exported."""

from __future__ import annotations

import json

import pytest
import torch

from CovidInfectionSegLib.model_package import load_model_package
from covidseg_training.checkpoint import load_checkpoint
from covidseg_training.config import TrainConfig
from covidseg_training.export import export_checkpoint
from covidseg_training.losses import deep_supervision_loss, segmentation_loss
from covidseg_training.train import train
from covidseg_training.unet import UNet2D


def test_auxiliary_heads_see_the_coarser_decoder_outputs():
    torch.manual_seed(0)
    model = UNet2D(base_channels=4, depth=3, auxiliary_heads=2).eval()
    x = torch.rand(2, 1, 64, 64)
    outputs = model.forward_deep(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 64, 64), (2, 3, 32, 32), (2, 3, 16, 16)]
    torch.testing.assert_close(outputs[0], model(x))
    with pytest.raises(ValueError, match="auxiliary_heads must be 0 to 2 for depth 3"):
        UNet2D(depth=3, auxiliary_heads=3)


def test_loss_weights_the_coarser_outputs_by_half_per_level():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16))
    full, half = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(deep_supervision_loss([full], target), segmentation_loss(full, target))
    expected = (segmentation_loss(full, target) + 0.5 * segmentation_loss(half, target[:, ::2, ::2])) / 1.5
    torch.testing.assert_close(deep_supervision_loss([full, half], target), expected)


def _tiny_run(tmp_path, data, name, deep_supervision):
    config = TrainConfig.from_dict({
        "name": name, "data": str(data), "output_dir": str(tmp_path / "runs"), "fold": 0, "n_folds": 3,
        "input_size": 64, "base_channels": 4, "depth": 3, "epochs": 1, "batch_size": 4, "threads": 1,
        "device": "cpu", "deep_supervision": deep_supervision,
    })
    return train(config, log=lambda _: None)


def test_training_uses_the_heads_and_export_leaves_them_out(tmp_path, labelled_slices):
    plain = _tiny_run(tmp_path, labelled_slices, "plain", 0)
    deep = _tiny_run(tmp_path, labelled_slices, "deep", 2)
    loss = [json.loads((run / "history.json").read_text(encoding="utf-8"))[0]["loss"] for run in (plain, deep)]
    assert loss[0] != pytest.approx(loss[1], abs=1e-4)  # same seed, same batches: only the heads differ
    saved = torch.load(deep / "best.pt", map_location="cpu", weights_only=False)["model"]
    assert {"auxiliary.0.weight", "auxiliary.1.weight"} <= set(saved)

    checkpoint = load_checkpoint(deep / "best.pt")
    assert not any(name.startswith("auxiliary.") for name in checkpoint.model.state_dict())
    manifest = export_checkpoint(checkpoint, tmp_path / "models", "deep", "0.0.1")
    package = load_model_package(manifest)
    plain_parameters = sum(p.numel() for p in UNet2D(base_channels=4, depth=3).parameters())
    assert json.loads(manifest.read_text(encoding="utf-8"))["architecture"]["parameters"] == plain_parameters
    trained = UNet2D(base_channels=4, depth=3, auxiliary_heads=2)
    trained.load_state_dict(saved)
    trained.eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(package.module(x), trained(x), atol=1e-5, rtol=0)
