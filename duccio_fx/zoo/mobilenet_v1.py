"""MLPerf Tiny visual-wake-words seed: MobileNetV1 with width multiplier α.

Reference shape (α = 0.25): input ``3×96×96``, output ``2`` logits. Conv 3×3/2 → 32α, thirteen
depthwise-separable blocks (64, 128, 128, 256, 256, 512×6, 1024, 1024 channels × α), global average
pool, ``Linear``. Convs carry biases like the MLPerf Keras reference (``bias=False`` drops them):
216 322 parameters and 7 489 664 MACs.
"""

from __future__ import annotations

import torch
from torch import nn

from ._layers import conv_bn_act

# (output channels at α = 1, stride) of the 13 depthwise-separable blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


class DepthwiseSeparable(nn.Module):
    """dw 3×3 (stride s) + BN + ReLU, then pw 1×1 + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, bias: bool = True) -> None:
        super().__init__()
        self.dw = conv_bn_act(in_ch, in_ch, 3, stride, groups=in_ch, bias=bias)
        self.pw = conv_bn_act(in_ch, out_ch, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017) with width multiplier ``alpha``."""

    def __init__(
        self, alpha: float = 0.25, num_classes: int = 2, in_channels: int = 3, dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        in_ch = int(32 * alpha)
        layers: list[nn.Module] = [conv_bn_act(in_channels, in_ch, 3, 2, bias=bias)]
        for ch, stride in BLOCKS:
            out_ch = int(ch * alpha)
            layers.append(DepthwiseSeparable(in_ch, out_ch, stride, bias))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.fc(self.dropout(x))


def mobilenet_v1(
    alpha: float = 0.25, num_classes: int = 2, input_size: int = 96, in_channels: int = 3, bias: bool = True
) -> MobileNetV1:
    """Build MobileNetV1; ``input_size`` only documents the intended resolution (any ≥ 32 works)."""
    if input_size < 32:
        raise ValueError(f"mobilenet_v1: input_size must be >= 32 (five stride-2 stages), got {input_size}")
    return MobileNetV1(alpha, num_classes, in_channels, bias=bias)
