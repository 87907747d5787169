"""EfficientNet-B0-like network (Tan & Le 2019), without stochastic depth.

Reference shape: input ``3×224×224``, ``1000`` logits. Stem conv 3×3/2 → 32, seven MBConv stages
(expand 1×1 + SiLU, k×k depthwise + SiLU, squeeze-excite with ``mean((2, 3), keepdim=True)`` →
1×1 reduce → SiLU → 1×1 expand → sigmoid → multiply, linear 1×1 project, residual when shapes allow),
head conv 1×1 → 1280, avgpool, dropout, Linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act

# (expand ratio, kernel, first stride, out channels, repeats) of the B0 stages.
B0: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)


class SqueezeExciteSiLU(nn.Module):
    """``x * sigmoid(expand(silu(reduce(mean_hw(x)))))``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-excite (SE ratio 0.25 of the block input)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.SiLU))
        layers += [
            conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExciteSiLU(hidden, max(1, in_ch // 4)),
            conv_bn_act(hidden, out_ch, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return self.block(x) + x
        return self.block(x)


class EfficientNet(nn.Module):
    """EfficientNet-B0 topology."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = 32
        layers: list[nn.Module] = [conv_bn_act(3, in_ch, 3, 2, act=nn.SiLU)]
        for expand, k, s, out_ch, n in B0:
            for i in range(n):
                layers.append(MBConv(in_ch, out_ch, expand, k, s if i == 0 else 1))
                in_ch = out_ch
        layers.append(conv_bn_act(in_ch, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet_b0(num_classes: int = 1000, dropout: float = 0.2) -> EfficientNet:
    """Build EfficientNet-B0 (input ``3×224×224``)."""
    return EfficientNet(num_classes, dropout)
