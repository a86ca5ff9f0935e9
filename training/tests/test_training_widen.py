"""Widening a trained UNet2D (widen.py, ``init_widen``): same function, wider network, copies that can learn apart."""

from __future__ import annotations

import pytest
import torch

from covidseg_training.checkpoint import initial_state
from covidseg_training.config import TrainConfig
from covidseg_training.unet import UNet2D
from covidseg_training.widen import widen_unet_state


def trained_like(base_channels: int, depth: int) -> UNet2D:
    """A UNet2D with random weights and batch-norm statistics that are not the defaults."""
    torch.manual_seed(0)
    model = UNet2D(base_channels=base_channels, depth=depth)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 1, 32, 32) * 2 + 1)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("training_mode", [False, True])
def test_the_widened_network_computes_what_the_narrow_one_did(training_mode):
    narrow = trained_like(4, 3)
    wide = UNet2D(base_channels=7, depth=3)
    wide.load_state_dict(widen_unet_state(narrow.state_dict(), 7, 3))
    assert wide.encoders[0][0].weight.shape[0] == 7 and wide.encoders[3][0].weight.shape[0] == 56
    narrow.train(training_mode)
    wide.train(training_mode)
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected, got = narrow(images), wide(images)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_copies_of_a_channel_get_different_gradients():
    narrow = trained_like(4, 2)
    wide = UNet2D(base_channels=6, depth=2)
    wide.load_state_dict(widen_unet_state(narrow.state_dict(), 6, 2, seed=3))
    first = wide.encoders[0][0].weight
    copies = [(new, old) for new in range(4, 6) for old in range(4) if torch.equal(first[new], first[old])]
    assert len(copies) == 2, "each added channel starts as a copy of an old one"
    wide.train()
    wide(torch.randn(4, 1, 32, 32)).square().mean().backward()
    for new, old in copies:
        assert not torch.allclose(first.grad[new], first.grad[old]), "a copy would never learn apart from its original"


def test_widening_keeps_the_depth_and_only_grows():
    state = trained_like(4, 2).state_dict()
    with pytest.raises(ValueError, match="another depth than 3"):
        widen_unet_state(state, 8, 3)
    with pytest.raises(ValueError, match="cannot widen 4 channels to fewer"):
        widen_unet_state(state, 2, 2)


def test_init_from_widens_an_exported_model_only_when_asked(tmp_path):
    narrow = trained_like(4, 2).eval()
    exported = tmp_path / "narrow.pt"
    torch.jit.script(narrow).save(str(exported))
    config = TrainConfig(base_channels=6, depth=2, init_from=str(exported), init_widen=True)
    wide = UNet2D(base_channels=6, depth=2)
    wide.load_state_dict(initial_state(exported, config))
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(wide.eval()(images), narrow(images), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"narrow.pt: cannot widen to UNet2D\(base_channels=6, depth=3\)"):
        initial_state(exported, TrainConfig(base_channels=6, depth=3, init_from=str(exported), init_widen=True))
    with pytest.raises(ValueError, match="weights do not fit"):
        initial_state(exported, TrainConfig(base_channels=6, depth=2, init_from=str(exported)))
