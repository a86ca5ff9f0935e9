"""Widen a trained UNet2D without changing what it computes (Net2WiderNet, Chen et al. 2016).

Every widened layer keeps its old channels and adds copies of randomly chosen ones (weights, bias and
batch-norm statistics copied); every layer that reads a copied channel splits that channel's old weight
among its copies. The split is random (fractions that sum to one), not equal, so the copies receive
different gradients and grow apart in training; with equal shares they would stay copies forever.

Used by ``init_from`` with ``init_widen``: does a wider network fit the data better than the one it
starts as? The answer then comes from a few epochs, not a run from scratch.
"""

from __future__ import annotations

import torch

BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def widen_unet_state(state: dict[str, torch.Tensor], base_channels: int, depth: int,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """The weights of ``UNet2D(base_channels, depth)`` computing the same function as ``state``, a
    narrower UNet2D of the same depth (its auxiliary heads are dropped)."""
    old_base = state["head.weight"].shape[1]
    if f"encoders.{depth}.0.weight" not in state or f"encoders.{depth + 1}.0.weight" in state:
        raise ValueError(f"weights of another depth than {depth}; widening keeps the depth")
    if base_channels < old_base:
        raise ValueError(f"cannot widen {old_base} channels to fewer ({base_channels})")
    generator = torch.Generator().manual_seed(seed)
    new = {name: value.clone() for name, value in state.items() if not name.startswith("auxiliary.")}

    def widen_block(prefix: str, sources: list[tuple[torch.Tensor, torch.Tensor]], width: int):
        """A conv block reading ``sources`` (each (mapping, share) of its input channels, concatenated);
        returns the (mapping, share) of its output channels."""
        mid = grow_outputs(new, f"{prefix}.0", f"{prefix}.1", width, generator)
        read_inputs(new, f"{prefix}.0.weight", sources, dim=1)
        out = grow_outputs(new, f"{prefix}.3", f"{prefix}.4", width, generator)
        read_inputs(new, f"{prefix}.3.weight", [mid], dim=1)
        return out

    skips = []
    previous = [identity(state["encoders.0.0.weight"].shape[1])]
    for level in range(depth + 1):
        output = widen_block(f"encoders.{level}", previous, base_channels * 2**level)
        skips.append(output)
        previous = [output]
    skips.pop()
    for index in range(depth):
        width = base_channels * 2 ** (depth - 1 - index)
        upsampled = grow_outputs(new, f"upsamplers.{index}", None, width, generator, out_dim=1)
        read_inputs(new, f"upsamplers.{index}.weight", previous, dim=0)
        previous = [widen_block(f"decoders.{index}", [upsampled, skips.pop()], width)]
    read_inputs(new, "head.weight", previous, dim=1)
    return new


def identity(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(channels), torch.ones(channels)


def grow_outputs(state, conv: str, norm: str | None, width: int, generator: torch.Generator,
                 out_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Give layer ``conv`` (and its batch norm ``norm``) ``width`` output channels: the old ones, then
    copies of random old ones. Returns the (mapping new -> old channel, share) its readers need."""
    old = state[f"{conv}.weight"].shape[out_dim]
    mapping = torch.cat([torch.arange(old), torch.randint(old, (width - old,), generator=generator)])
    state[f"{conv}.weight"] = state[f"{conv}.weight"].index_select(out_dim, mapping)
    if f"{conv}.bias" in state:
        state[f"{conv}.bias"] = state[f"{conv}.bias"][mapping]
    if norm is not None:
        for tensor in BATCH_NORM_TENSORS:
            state[f"{norm}.{tensor}"] = state[f"{norm}.{tensor}"][mapping]
    weights = 0.5 + torch.rand(width, generator=generator)
    totals = torch.zeros(old).index_add_(0, mapping, weights)
    return mapping, weights / totals[mapping]


def read_inputs(state, name: str, sources: list[tuple[torch.Tensor, torch.Tensor]], dim: int) -> None:
    """Make weight ``name`` read the widened channels of ``sources`` (concatenated along ``dim``)."""
    weight = state[name]
    parts, start = [], 0
    for mapping, share in sources:
        old = int(mapping.max()) + 1
        block = weight.narrow(dim, start, old).index_select(dim, mapping)
        shape = [1] * weight.dim()
        shape[dim] = len(mapping)
        parts.append(block * share.reshape(shape).to(weight.dtype))
        start += old
    if start != weight.shape[dim]:
        raise ValueError(f"{name}: reads {weight.shape[dim]} channels, the widened inputs give {start}")
    state[name] = torch.cat(parts, dim=dim)
