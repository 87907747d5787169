"""MLPerf Tiny image-classification seed: ResNet-8 for CIFAR-10.

Reference shape: input ``3×32×32``, output ``10`` logits. Stem conv 3×3 → 16, three residual
stacks of 16/32/64 filters (stacks 2 and 3 downsample with a strided 3×3 conv and a plain strided
1×1 conv shortcut), global average pool, ``Linear(64, 10)``.
Conv + FC weights: 77 360 (76 720 conv + 640 FC); MACs: 12 501 632.
"""

from __future__ import annotations

import torch
from torch import nn


class ResNet8Block(nn.Module):
    """Basic block: conv3×3-BN-ReLU-conv3×3-BN, plus identity or 1×1 conv shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = (
            nn.Conv2d(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else nn.Identity()
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class ResNet8(nn.Module):
    """MLPerf Tiny ResNet-8 (CIFAR-10)."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.stack1 = ResNet8Block(widths[0], widths[0], 1)
        self.stack2 = ResNet8Block(widths[0], widths[1], 2)
        self.stack3 = ResNet8Block(widths[1], widths[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stack3(self.stack2(self.stack1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet8(num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (16, 32, 64)) -> ResNet8:
    """Build ResNet-8 (input ``in_channels×32×32``)."""
    return ResNet8(num_classes, in_channels, widths)
