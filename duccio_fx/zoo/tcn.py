"""Temporal convolutional network (Bai et al. 2018 style) for 1-D sequences.

Reference shape: input ``4×128`` (channels × time steps), ``10`` logits. Residual blocks of two causal
dilated ``Conv1d`` (kernel 3, dilations 1, 2, 4, 8) with BN1d + ReLU, 1×1 ``Conv1d`` shortcut when the
channel count changes; head ``x.mean(-1)`` over time then Linear. The first conv of each block pads
both sides and slices ``x[:, :, :-pad]``; the second left-pads with ``F.pad`` (both causal styles).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TemporalBlock(nn.Module):
    """Two causal dilated convolutions with a residual connection."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(in_ch, out_ch, kernel, padding=self.pad, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm1d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv1d(out_ch, out_ch, kernel, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm1d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)[:, :, : -self.pad]
        y = self.relu1(self.bn1(y))
        y = self.conv2(F.pad(y, (self.pad, 0)))
        y = self.relu2(self.bn2(y))
        return self.relu(y + self.shortcut(x))


class TCN(nn.Module):
    """Stack of temporal blocks with dilation ``2**i`` followed by a time-mean and a Linear head."""

    def __init__(
        self, in_channels: int = 4, channels: Sequence[int] = (16, 32, 32, 32), kernel: int = 3, num_classes: int = 10
    ) -> None:
        super().__init__()
        if kernel < 2:
            raise ValueError(f"tcn: kernel must be >= 2 for causal padding, got {kernel}")
        blocks: list[nn.Module] = []
        in_ch = in_channels
        for i, ch in enumerate(channels):
            blocks.append(TemporalBlock(in_ch, ch, kernel, 2**i))
            in_ch = ch
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(x).mean(-1))


def tcn(
    in_channels: int = 4, channels: Sequence[int] = (16, 32, 32, 32), kernel: int = 3, num_classes: int = 10
) -> TCN:
    """Build the TCN (input ``in_channels×T``, default ``4×128``)."""
    return TCN(in_channels, tuple(channels), kernel, num_classes)
