"""MobileNetV3-Small-like network (Howard et al. 2019).

Reference shape: input ``3×224×224``, ``1000`` logits. Inverted residuals with optional
squeeze-excite (avgpool → 1×1 reduce → ReLU → 1×1 expand → Hardsigmoid, scale multiplied onto the
feature map), ReLU or Hardswish activations, 1×1 576 head conv, ``Linear(576, 1024)`` + Hardswish +
``Linear(1024, classes)``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act, make_divisible

# (kernel, expanded channels, out channels, squeeze-excite, hardswish, stride)
SMALL: tuple[tuple[int, int, int, bool, bool, int], ...] = (
    (3, 16, 16, True, False, 2),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)


class SqueezeExcite(nn.Module):
    """Channel attention: ``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidualSE(nn.Module):
    """[1×1 expand] → k×k depthwise → [SE] → linear 1×1 project, residual when shapes allow."""

    def __init__(self, in_ch: int, kernel: int, exp: int, out_ch: int, se: bool, hswish: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if exp != in_ch:
            layers.append(conv_bn_act(in_ch, exp, 1, act=act))
        layers.append(conv_bn_act(exp, exp, kernel, stride, groups=exp, act=act))
        if se:
            layers.append(SqueezeExcite(exp, make_divisible(exp // 4, 8)))
        layers.append(conv_bn_act(exp, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small with width multiplier ``width_mult``."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(16 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(3, in_ch, 3, 2, act=nn.Hardswish)]
        for k, exp, out, se, hs, s in SMALL:
            exp_ch, out_ch = make_divisible(exp * width_mult), make_divisible(out * width_mult)
            layers.append(InvertedResidualSE(in_ch, k, exp_ch, out_ch, se, hs, s))
            in_ch = out_ch
        last_conv = 6 * in_ch
        layers.append(conv_bn_act(in_ch, last_conv, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, 1024), nn.Hardswish(), nn.Dropout(dropout), nn.Linear(1024, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_small(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV3Small:
    """Build MobileNetV3-Small (input ``3×224×224``)."""
    return MobileNetV3Small(num_classes, width_mult, dropout)
