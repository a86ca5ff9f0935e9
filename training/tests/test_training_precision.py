"""Which arithmetic training runs in on each device (``train.precision_for``), and what of it a resumed
run keeps (the fp16 loss scale) or leaves to the device (pinned batches)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

import pytest
import torch

from covidseg_training.config import TrainConfig
from covidseg_training.train import epoch_batches, precision_for, resume, resume_point


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_bf16_on_a_gpu_only_where_it_is_native(monkeypatch, major: int, expected: torch.dtype) -> None:
    """No GPU here: the compute capability is faked (V100/T4 are 7, A100 8, H100/H200 9). On 7,
    torch.cuda.is_bf16_supported() says yes, but bf16 is emulated there: fp16 with loss scaling instead."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    assert precision_for(torch.device("cuda")) == expected


def test_cpu_without_native_bf16_trains_in_float32() -> None:
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has native bf16")
    assert precision_for(torch.device("cpu")) == torch.float32


def _trained_a_little(scaler: torch.amp.GradScaler) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        optimizer.zero_grad()
        scaler.scale(model(torch.randn(4, 3)).square().sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return model, optimizer


def test_a_resumed_run_keeps_its_fp16_loss_scale(tmp_path: Path) -> None:
    """Through a real last.pt on disk. Without the scaler's state, an fp16 run that resumes falls back
    to the initial scale and skips steps until it has found its scale again. The CPU scaler stands in
    for the GPU's: the two keep the same state."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    model, optimizer = _trained_a_little(scaler)
    assert scaler.get_scale() != 1024.0
    torch.save(resume_point(model, optimizer, scaler, {"epoch": 3}), tmp_path / "last.pt")

    fresh_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    fresh_model = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=0.01)
    state = resume(torch.load(tmp_path / "last.pt", weights_only=False), fresh_model, fresh_optimizer, fresh_scaler)
    assert state == {"epoch": 3}
    assert fresh_scaler.get_scale() == scaler.get_scale()
    torch.testing.assert_close(fresh_model.state_dict(), model.state_dict())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 3


def test_a_last_pt_without_a_loss_scale_still_resumes() -> None:
    """last.pt files written before the scale was kept (and every float32 or bf16 run's) have none."""
    model, optimizer = _trained_a_little(torch.amp.GradScaler("cpu", enabled=False))
    old_style = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": {"epoch": 3}}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    fresh_model = torch.nn.Linear(3, 2)
    assert resume(old_style, fresh_model, torch.optim.AdamW(fresh_model.parameters()), scaler) == {"epoch": 3}
    torch.testing.assert_close(fresh_model.state_dict(), model.state_dict())
    assert scaler.get_scale() == 1024.0


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_are_pinned_only_for_a_gpu(device: str, pinned: bool) -> None:
    """Pinning follows the device the run trains on, not whether the machine has a GPU somewhere."""
    slices = [(np.zeros((64, 64), dtype=np.uint8), np.zeros((64, 64), dtype=np.uint8))] * 4
    config = TrainConfig.from_dict({"input_size": 64, "batch_size": 2})
    assert epoch_batches(slices, config, epoch=0, steps=2, device=torch.device(device)).pin_memory is pinned
