"""The networks of DORY's GAP8 regression tests (pulp-platform/dory_examples), rebuilt layer for layer, with
the cycles DORY measured for them.

Source: dory_examples, `network_tested/*.txt` (GVSOC runs of GAP8, 8 cores, 8-bit PULP-NN, commit 5084418f,
2021-09: whole-network `num_cycles`) and `launch_regression_test.sh` at commit ec6ef07 (2022-03: MAC/cycle only,
the figures DORY's README quotes: MobileNetV1 8.76, Residual 6.44, MobileNetV2 3.86, DS-CNN 2.98). The shapes
come from the ONNX files of those commits (MobileNetV1/V2: the standard 1.0-width 128x128 networks, whose
MAC counts equal DORY's exactly). DORY counts a residual add as C*C*H*W "MACs" and pooling as 0; `dory_macs`
keeps its count so MAC/cycle compares like with like. Regression settings: L1 38 000 B beside the stacks,
L2 380 000 B (MobileNetV2: 360 000, L1 34 000; the dronets: L2 420 000), BNRelu bits 32 or 64 as listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from duccio_fx.zoo.mobilenet_v1 import mobilenet_v1
from duccio_fx.zoo.mobilenet_v2 import mobilenet_v2


def cbr(cin: int, cout: int, k: int | tuple[int, int], s: int = 1, p: int | tuple[int, int] = 0,
        g: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """Residual_connection_test_1/2: 200x200x1, a 16-channel stem, one residual add (with a 1x1 skip in 2)."""

    def __init__(self, skip_conv: bool) -> None:
        super().__init__()
        self.c0, self.c1, self.c2 = cbr(1, 16, 5, 2, 2), cbr(16, 16, 3, 2, 1), cbr(16, 16, 3, 2, 1)
        self.c3, self.c4, self.c6 = cbr(16, 16, 3, 1, 1), cbr(16, 16, 3, 1, 1), cbr(16, 16, 3, 1, 1)
        self.skip = cbr(16, 16, 1) if skip_conv else nn.Identity()
        self.fc = nn.Linear(10000, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.c1(self.c0(x)))
        z = torch.relu(self.c4(self.c3(y)) + self.skip(y))
        return self.fc(torch.flatten(self.c6(z), 1))


def flatten_into(features: list[nn.Module], head: list[nn.Module]) -> nn.Sequential:
    """A feature extractor, flattened into a fully connected head."""
    return nn.Sequential(*features, nn.Flatten(), *head)


def dscnn_test() -> nn.Module:
    """dscnn_test: 49x10x1, conv 10x4 /2 (pads 5,1) -> 64, four dw3x3 + pw blocks, average pool, FC 10."""
    blocks = [m for _ in range(4) for m in (cbr(64, 64, 3, 1, 1, g=64), cbr(64, 64, 1))]
    return flatten_into([cbr(1, 64, (10, 4), 2, (5, 1)), *blocks, nn.AvgPool2d((25, 5))], [nn.Linear(64, 10)])


def penguinet() -> nn.Module:
    """PenguiNet: 96x160x1, conv 5x5 /2, max pool 2, six 3x3 convs, FC 1920 -> 4."""
    return flatten_into([cbr(1, 32, 5, 2, 2), nn.MaxPool2d(2), cbr(32, 32, 3, 2, 1), cbr(32, 32, 3, 1, 1),
                         cbr(32, 64, 3, 2, 1), cbr(64, 64, 3, 1, 1), cbr(64, 128, 3, 2, 1), cbr(128, 128, 3, 1, 1)],
                        [nn.Linear(1920, 4)])


def smart_agri() -> nn.Module:
    """SmartAgri-net: 40x40x1, four conv 3x3 + max pool stages, four FC layers."""
    conv = lambda cin, cout: nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), nn.ReLU())  # noqa: E731
    return flatten_into([conv(1, 32), nn.MaxPool2d(2), conv(32, 64), nn.MaxPool2d(2), conv(64, 128), nn.MaxPool2d(2),
                         conv(128, 128), nn.MaxPool2d(3, 2)],
                        [nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10), nn.ReLU(),
                         nn.Linear(10, 2)])


class Dronet(nn.Module):
    """dronet_complete (max pool after the stem) / dronet_no_pooling (a 2x2 /2 conv instead): 200x200x1, three
    residual blocks with 1x1 /2 skips, FC -> 2."""

    def __init__(self, pooling: bool) -> None:
        super().__init__()
        self.stem = cbr(1, 32, 5, 2, 2)
        self.down = nn.MaxPool2d(2) if pooling else cbr(32, 32, 2, 2, 2)
        self.blocks = nn.ModuleList()
        for cin, cout in ((32, 32), (32, 64), (64, 128)):
            self.blocks.append(nn.ModuleList([cbr(cin, cout, 3, 2, 1), cbr(cout, cout, 3, 1, 1), cbr(cin, cout, 1, 2)]))
        self.fc = nn.Linear(6272, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(self.stem(x))
        for a, b, skip in self.blocks:
            x = torch.relu(b(a(x)) + skip(x))
        return self.fc(torch.flatten(x, 1))


@dataclass(frozen=True)
class Measured:
    name: str
    build: Callable[[], tuple[nn.Module, torch.Tensor]]
    cycles: int               # num_cycles of the 2021-09 GVSOC log
    dory_macs: int            # DORY's MAC count (adds as C*C*H*W)
    bnrelu_bits: int          # BNRelu_bits of the regression script
    l1: int = 38000           # L1 bytes beside the stacks
    l2: int = 380000
    readme: float | None = None  # MAC/cycle of the 2022-03 regression script (DORY's README figures)


def _mv1() -> tuple[nn.Module, torch.Tensor]:
    return mobilenet_v1(alpha=1.0, num_classes=1000, input_size=128).eval(), torch.randn(1, 3, 128, 128)


def _mv2() -> tuple[nn.Module, torch.Tensor]:
    return mobilenet_v2(num_classes=1000, input_size=128).eval(), torch.randn(1, 3, 128, 128)


Builder = Callable[[], tuple[nn.Module, torch.Tensor]]


def _of(cls: Callable[..., nn.Module], shape: tuple[int, ...], *args: bool) -> Builder:
    return lambda: (cls(*args).eval(), torch.randn(1, *shape))


NETWORKS = (
    Measured("MobileNetV1-128", _mv1, 21_746_304, 186_400_768, 32, readme=8.759356),
    Measured("DS-CNN", _of(dscnn_test, (1, 49, 10)), 894_814, 2_656_640, 64, readme=2.975287),
    Measured("MobileNetV2-128", _mv2, 24_544_774, 102_973_440, 64, l1=34000, l2=360000, readme=3.860595),
    Measured("Residual-1", _of(Residual, (1, 200, 200), False), 2_483_003, 15_700_000, 32, readme=6.442216),
    Measured("Residual-2", _of(Residual, (1, 200, 200), True), 3_436_930, 15_860_000, 64, readme=4.667706),
    Measured("PenguiNet-32", _of(penguinet, (1, 96, 160)), 2_912_105, 14_138_880, 32, readme=4.790517),
    Measured("PenguiNet-64", _of(penguinet, (1, 96, 160)), 3_493_610, 14_138_880, 64, readme=3.983492),
    Measured("SmartAgri", _of(smart_agri, (1, 40, 40)), 3_217_734, 19_288_596, 64, readme=5.930013),
    Measured("Dronet", _of(Dronet, (1, 200, 200), True), 7_485_495, 43_238_144, 64, l2=420000, readme=5.754563),
    Measured("Dronet-no-pool", _of(Dronet, (1, 200, 200), False), 8_844_734, 55_358_208, 64, l1=34000, l2=420000,
             readme=5.810254),
)
