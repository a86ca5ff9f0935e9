"""Which arithmetic training runs in on each device (``train.precision_for``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from covidseg_training.train import precision_for


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
