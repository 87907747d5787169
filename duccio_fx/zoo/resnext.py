"""Small ResNeXt-like network (Xie et al. 2017) for 64×64 inputs.

Reference shape: input ``3×64×64``, ``200`` logits. Stem conv 3×3/2 → 64 + BN + ReLU, then three
stages of ResNeXt bottlenecks (1×1 reduce to ``cardinality × base_width × 2^i`` channels, grouped 3×3
with ``groups = cardinality`` (32 × 4d), 1×1 expand ×2, BN everywhere, 1×1 conv + BN projection
shortcut when shapes change), avgpool, Linear.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ResNeXtBlock(nn.Module):
    """Aggregated-transform bottleneck with a grouped 3×3 conv."""

    def __init__(self, in_ch: int, width: int, out_ch: int, groups: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


class ResNeXt(nn.Module):
    """Three-stage ResNeXt (``cardinality``×``base_width``d)."""

    def __init__(
        self,
        blocks: Sequence[int] = (1, 1, 1),
        cardinality: int = 32,
        base_width: int = 4,
        expansion: int = 2,
        num_classes: int = 200,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        in_ch = 64
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            width = cardinality * base_width * 2**i
            out_ch = width * expansion
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                stages.append(ResNeXtBlock(in_ch, width, out_ch, cardinality, stride))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnext(
    blocks: Sequence[int] = (1, 1, 1), cardinality: int = 32, base_width: int = 4, num_classes: int = 200
) -> ResNeXt:
    """Build the small ResNeXt 32×4d (input ``3×64×64``)."""
    return ResNeXt(tuple(blocks), cardinality, base_width, 2, num_classes)
