"""ShuffleNet-V2-like network (Ma et al. 2018) for 32×32 inputs.

Reference shape: input ``3×32×32``, ``10`` logits. Stride-1 units split channels with
``x.chunk(2, dim=1)``, transform one half (1×1, dw 3×3, 1×1) and concatenate; stride-2 units run two
branches on the full input and concatenate; every unit ends with a channel shuffle written as
``view`` → ``transpose`` → ``view`` (the stride-1 units can be built without it).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._layers import conv_bn_act


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` channel groups (``C`` must be divisible by ``groups``)."""
    n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet-V2 unit; ``stride == 1`` requires ``in_ch == out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, shuffle: bool = True) -> None:
        super().__init__()
        if stride == 1 and in_ch != out_ch:
            raise ValueError(f"ShuffleUnit: stride-1 unit needs in_ch == out_ch, got {in_ch} -> {out_ch}")
        self.stride = stride
        self.shuffle = shuffle
        half = out_ch // 2
        b_in = in_ch if stride == 2 else in_ch // 2
        self.branch2 = nn.Sequential(
            conv_bn_act(b_in, half, 1),
            conv_bn_act(half, half, 3, stride, groups=half, act=None),
            conv_bn_act(half, half, 1),
        )
        self.branch1: nn.Module = nn.Identity()
        if stride == 2:
            self.branch1 = nn.Sequential(
                conv_bn_act(in_ch, in_ch, 3, 2, groups=in_ch, act=None), conv_bn_act(in_ch, half, 1)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], dim=1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], dim=1)
        return channel_shuffle(out, 2) if self.shuffle else out


class ShuffleNetLike(nn.Module):
    """Stem conv 3×3 → 24, three stages (first unit stride 2), 1×1 head conv, avgpool, Linear."""

    def __init__(
        self,
        stage_channels: Sequence[int] = (48, 96, 192),
        stage_repeats: Sequence[int] = (2, 2, 2),
        num_classes: int = 10,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(3, 24, 3)
        in_ch = 24
        units: list[nn.Module] = []
        for ch, n in zip(stage_channels, stage_repeats):
            units.append(ShuffleUnit(in_ch, ch, 2, shuffle))
            units += [ShuffleUnit(ch, ch, 1, shuffle) for _ in range(n - 1)]
            in_ch = ch
        self.stages = nn.Sequential(*units)
        self.conv5 = conv_bn_act(in_ch, 512, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.conv1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def shufflenet_like(
    stage_channels: Sequence[int] = (48, 96, 192),
    stage_repeats: Sequence[int] = (2, 2, 2),
    num_classes: int = 10,
    shuffle: bool = True,
) -> ShuffleNetLike:
    """Build the ShuffleNet-V2-like net (input ``3×32×32``); ``shuffle=False`` drops the shuffles."""
    return ShuffleNetLike(tuple(stage_channels), tuple(stage_repeats), num_classes, shuffle)
