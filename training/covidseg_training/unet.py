"""A plain 2D U-Net (Ronneberger et al. 2015) with batch norm, sized by two numbers."""

from __future__ import annotations

import torch
from torch import nn


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """U-Net with ``depth`` poolings; channels double per level from ``base_channels``.

    Input: (N, in_channels, H, W) with H and W divisible by 2**depth. Output: logits (N, classes, H, W).

    Deep supervision (training only): ``auxiliary_heads`` 1x1 heads on the decoder's next coarser
    outputs (half, quarter, ... the input size), read by :meth:`forward_deep`. ``forward`` and an
    exported model never use them (export builds the network without them).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 3, base_channels: int = 16, depth: int = 4,
                 auxiliary_heads: int = 0):
        super().__init__()
        if not 0 <= auxiliary_heads < depth:
            raise ValueError(f"auxiliary_heads must be 0 to {depth - 1} for depth {depth}, got {auxiliary_heads}")
        channels = [base_channels * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.encoders.append(conv_block(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.decoders.append(conv_block(width * 2, width))
        self.head = nn.Conv2d(channels[0], num_classes, 1)
        self.auxiliary = nn.ModuleList(nn.Conv2d(channels[level], num_classes, 1)
                                       for level in range(1, auxiliary_heads + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoded(x, every_level=False)[-1])

    def forward_deep(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits at full size, then from each auxiliary head at half, quarter, ... size."""
        decoded = self.decoded(x, every_level=True)
        return [self.head(decoded[-1])] + [head(decoded[-2 - k]) for k, head in enumerate(self.auxiliary)]

    def decoded(self, x: torch.Tensor, every_level: bool) -> list[torch.Tensor]:
        """The decoder's outputs, coarsest first and the full-size one last; only that one unless
        ``every_level`` (inference keeps no coarser maps alive)."""
        skips: list[torch.Tensor] = []
        for index, encoder in enumerate(self.encoders):
            x = encoder(x)
            if index < len(self.encoders) - 1:
                skips.append(x)
                x = self.pool(x)
        outputs: list[torch.Tensor] = []
        level = len(self.decoders)
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = upsample(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
            level -= 1
            if every_level or level == 0:
                outputs.append(x)
        return outputs
