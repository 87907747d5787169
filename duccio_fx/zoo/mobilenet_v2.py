"""MobileNetV2 (Sandler et al. 2018) in torchvision's layout (``features`` and ``classifier``).

Reference shape: input ``3×224×224`` (any size ≥ 32 works), ``1000`` logits. Inverted residual blocks
(1×1 expand + ReLU6, 3×3 depthwise + ReLU6, linear 1×1 project) with a residual add when the stride
is 1 and input and output channels match.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act, make_divisible

# (expansion t, channels c, repeats n, first stride s) at width 1.0.
SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """MobileNetV2 block; ``conv`` is a Sequential like torchvision's."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier ``width_mult``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_act(3, in_ch, 3, 2, act=nn.ReLU6)]
        for t, c, n, s in SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(conv_bn_act(in_ch, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v2(
    num_classes: int = 1000, width_mult: float = 1.0, input_size: int = 224, dropout: float = 0.2
) -> MobileNetV2:
    """Build MobileNetV2; ``input_size`` documents the intended resolution (must be ≥ 32)."""
    if input_size < 32:
        raise ValueError(f"mobilenet_v2: input_size must be >= 32 (five stride-2 stages), got {input_size}")
    return MobileNetV2(num_classes, width_mult, dropout)
