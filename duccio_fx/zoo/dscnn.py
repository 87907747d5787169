"""MLPerf Tiny keyword-spotting seed: DS-CNN (small).

Reference shape: input ``1×49×10`` (MFCC frames × coefficients), output ``12`` logits.
Conv 10×4 stride 2 pad (5, 1) → 64 (25×5 map), four depthwise-separable blocks (dw 3×3 + pw 1×1,
each with BN + ReLU), global average pool, ``Linear(64, 12)``. MACs: 2 656 768. Convs carry biases
like the MLPerf Keras reference (``bias=False`` drops them): 23 756 parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class DSBlock(nn.Module):
    """Depthwise 3×3 + BN + ReLU followed by pointwise 1×1 + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, bias: bool = True) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_ch, in_ch, 3, 1, 1, groups=in_ch, bias=bias)
        self.dw_bn = nn.BatchNorm2d(in_ch)
        self.dw_relu = nn.ReLU()
        self.pw = nn.Conv2d(in_ch, out_ch, 1, bias=bias)
        self.pw_bn = nn.BatchNorm2d(out_ch)
        self.pw_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw_relu(self.dw_bn(self.dw(x)))
        return self.pw_relu(self.pw_bn(self.pw(x)))


class DSCNN(nn.Module):
    """MLPerf Tiny DS-CNN for Speech Commands (12 classes)."""

    def __init__(
        self, num_classes: int = 12, channels: int = 64, num_blocks: int = 4, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, (10, 4), stride=2, padding=(5, 1), bias=bias)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.dropout1 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.blocks = nn.Sequential(*[DSBlock(channels, channels, bias) for _ in range(num_blocks)])
        self.dropout2 = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout1(self.relu(self.bn1(self.conv1(x))))
        x = self.dropout2(self.blocks(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def dscnn(
    num_classes: int = 12, channels: int = 64, num_blocks: int = 4, dropout: float = 0.0, bias: bool = True
) -> DSCNN:
    """Build DS-CNN (input ``1×49×10``)."""
    return DSCNN(num_classes, channels, num_blocks, dropout, bias)
