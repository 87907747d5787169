"""An example model file for duccio-fx (the `model.py` contract, see README).

A small residual CNN for 28x28 grey-scale digits: `duccio-fx inspect examples/model.py`.
"""

import torch
from torch import nn


class DigitNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width, bias=False),
                                nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.conv2(self.conv1(x)))
        x = self.pw(self.dw(self.down(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model() -> nn.Module:
    return DigitNet()


def example_input() -> torch.Tensor:
    return torch.zeros(1, 1, 28, 28)
