"""ResNet-18 / ResNet-50 (ImageNet, torchvision attribute layout) and the DUCCIO Tiny ImageNet ResNet-18.

Reference shapes: ``resnet18``/``resnet50``: input ``3×224×224``, ``1000`` logits.
``resnet18_tinyimagenet``: input ``3×64×64``, stem conv 3×3 stride 1 with no max-pool, ``200`` logits.
Attribute names follow torchvision (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``,
``avgpool``, ``fc``; blocks hold ``conv1``/``bn1``/``conv2``/``bn2``[/``conv3``/``bn3``]/``downsample``).
The bottleneck puts the stride on its 3×3 conv (ResNet v1.5).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BN; identity or 1×1 conv + BN shortcut; add then ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_ch, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (strided), 1×1 expand ×4, each with BN; shortcut; add then ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[type[BasicBlock], type[Bottleneck]]


class ResNet(nn.Module):
    """Generic ResNet; ``small_stem`` selects conv 3×3/1 with no max-pool (for 32–64 px inputs)."""

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        small_stem: bool = False,
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        stem = widths[0]
        if small_stem:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_stem else nn.MaxPool2d(3, 2, 1)
        in_ch = stem
        stages: list[nn.Sequential] = []
        for i, (planes, n) in enumerate(zip(widths, layers)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, planes, stride))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 for ``3×224×224`` inputs."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (v1.5) for ``3×224×224`` inputs."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def resnet18_tinyimagenet(num_classes: int = 200) -> ResNet:
    """DUCCIO paper's Tiny ImageNet ResNet-18: ``3×64×64``, 3×3/1 stem, no max-pool."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, small_stem=True)
