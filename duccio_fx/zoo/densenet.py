"""Small DenseNet-BC-like network for CIFAR-10.

Reference shape: input ``3×32×32``, ``10`` logits. Stem conv 3×3 → 2k channels, three dense blocks of
four bottleneck layers (BN-ReLU-conv1×1 → 4k, BN-ReLU-conv3×3 → k; growth k = 12) where each layer
concatenates its output onto the running concatenation (``torch.cat`` on dim 1, so concatenations
nest), transitions BN-ReLU-conv1×1 (compression 0.5) + avgpool 2, final BN-ReLU, avgpool, Linear.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class DenseLayer(nn.Module):
    """Bottleneck dense layer returning ``cat([x, f(x)], 1)``."""

    def __init__(self, in_ch: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_ch, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(self.relu1(self.norm1(x)))
        y = self.conv2(self.relu2(self.norm2(y)))
        return torch.cat([x, y], 1)


class Transition(nn.Sequential):
    """BN-ReLU-conv1×1-avgpool2 between dense blocks."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.AvgPool2d(2)
        )


class DenseNet(nn.Module):
    """DenseNet-BC with ``len(block_layers)`` dense blocks."""

    def __init__(
        self,
        growth: int = 12,
        block_layers: Sequence[int] = (4, 4, 4),
        compression: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        ch = 2 * growth
        layers: list[nn.Module] = [nn.Conv2d(3, ch, 3, 1, 1, bias=False)]
        for i, n in enumerate(block_layers):
            for _ in range(n):
                layers.append(DenseLayer(ch, growth))
                ch += growth
            if i != len(block_layers) - 1:
                out = int(ch * compression)
                layers.append(Transition(ch, out))
                ch = out
        layers += [nn.BatchNorm2d(ch), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def densenet(growth: int = 12, block_layers: Sequence[int] = (4, 4, 4), num_classes: int = 10) -> DenseNet:
    """Build the small DenseNet (input ``3×32×32``)."""
    return DenseNet(growth, tuple(block_layers), 0.5, num_classes)
