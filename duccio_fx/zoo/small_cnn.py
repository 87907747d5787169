"""Small CNNs that exercise graph shapes the larger families do not.

``lenet5``: input ``1×28×28`` (MNIST / Fashion-MNIST), ``10`` logits; two conv-BN-ReLU-maxpool stages
and a *flatten head* (``x.flatten(1)`` of a 16×4×4 map into ``Linear(256, 120)``), so channel masks
must propagate through a flatten into a Linear.
``two_head_cnn``: input ``3×32×32``; returns a tuple ``(logits [N, 10], features [N, 64])`` where the
features feed both the classifier and the output.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act


class LeNet5(nn.Module):
    """LeNet-5 with BatchNorm and a flatten-into-Linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, c1: int = 6, c2: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.BatchNorm2d(c1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(c2 * 4 * 4, 120)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).flatten(1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class TwoHeadCNN(nn.Module):
    """Conv trunk whose pooled embedding is returned alongside the logits."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            conv_bn_act(3, width, 3),
            conv_bn_act(width, 2 * width, 3, 2),
            conv_bn_act(2 * width, 4 * width, 3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.flatten(self.avgpool(self.trunk(x)), 1)
        return self.fc(feats), feats


def lenet5(num_classes: int = 10, in_channels: int = 1) -> LeNet5:
    """Build LeNet-5 (input ``in_channels×28×28``)."""
    return LeNet5(num_classes, in_channels)


def two_head_cnn(num_classes: int = 10, width: int = 16) -> TwoHeadCNN:
    """Build the two-output CNN (input ``3×32×32``)."""
    return TwoHeadCNN(num_classes, width)
