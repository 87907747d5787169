"""MLPerf Tiny anomaly-detection seed: fully connected autoencoder (ToyADMOS).

Reference shape: input ``640`` (5 frames × 128 log-mel bins), output ``640`` (reconstruction).
640→128, 3×128→128, bottleneck 128→8, 8→128, 3×128→128 (each Linear + BN1d + ReLU), then a plain
``Linear(128, 640)``. MACs: 264 192.
"""

from __future__ import annotations

import torch
from torch import nn


def _dense(in_f: int, out_f: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_f, out_f), nn.BatchNorm1d(out_f), nn.ReLU())


class FCAutoencoder(nn.Module):
    """Dense autoencoder: encoder (4 × hidden, bottleneck) and mirrored decoder."""

    def __init__(self, input_dim: int = 640, hidden: int = 128, bottleneck: int = 8, depth: int = 4) -> None:
        super().__init__()
        enc = [_dense(input_dim, hidden)] + [_dense(hidden, hidden) for _ in range(depth - 1)]
        self.encoder = nn.Sequential(*enc, _dense(hidden, bottleneck))
        dec = [_dense(bottleneck, hidden)] + [_dense(hidden, hidden) for _ in range(depth - 1)]
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def fc_autoencoder(input_dim: int = 640, hidden: int = 128, bottleneck: int = 8, depth: int = 4) -> FCAutoencoder:
    """Build the MLPerf Tiny AD autoencoder (input ``input_dim``)."""
    return FCAutoencoder(input_dim, hidden, bottleneck, depth)
