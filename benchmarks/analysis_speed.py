"""How long trace + shape propagation + channel analysis + layer costs take.

    python benchmarks/analysis_speed.py [--reps 7]

Measures (median of --reps runs after one warm-up run, which is reported separately):
* ResNet-50 at 224x224 (batch 1), the issue's target: under 0.3 s on a 2-core machine;
* synthetic chains of N layers (conv-bn-relu, with a residual add every 2 layers) for several N, to show
  that the cost grows linearly with the number of nodes (time per node stays flat).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import duccio_fx
from duccio_fx import zoo


class ResidualChain(nn.Module):
    """`layers` conv3x3-BN-ReLU layers of 8 channels at 8x8, a residual add after every second layer."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(layers))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(layers))
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(x)))
            if i % 2 == 1:
                x = x + skip
                skip = x
        return self.head(torch.flatten(x, 1))


def time_analysis(model: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, float, dict[str, float], int]:
    """(first run seconds, median seconds, median per-pass seconds, node count)."""
    start = time.perf_counter()
    gm = duccio_fx.analyze(model, x)
    first = time.perf_counter() - start
    totals, per_pass = [], []
    for _ in range(reps):
        timer = duccio_fx.TimePasses()
        start = time.perf_counter()
        gm = duccio_fx.analyze(model, x, instruments=[timer])
        totals.append(time.perf_counter() - start)
        per_pass.append(timer.seconds)
    passes = {k: statistics.median(p[k] for p in per_pass) for k in per_pass[0]}
    return first, statistics.median(totals), passes, len(gm.graph.nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sizes", default="250,500,1000,2000")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model, x = zoo.build("resnet50")
    first, med, passes, nodes = time_analysis(model, x, args.reps)
    trace = med - sum(passes.values())
    print(f"ResNet-50 224x224: {nodes} nodes, median {med * 1000:.0f} ms (first run {first * 1000:.0f} ms); "
          f"trace {trace * 1000:.0f} ms, " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in passes.items()))

    print("synthetic residual chain (layers, nodes, median ms, us per node):")
    for layers in (int(s) for s in args.sizes.split(",")):
        _, med, _, nodes = time_analysis(ResidualChain(layers), torch.randn(1, 8, 8, 8), max(3, args.reps // 2))
        print(f"  {layers:5d} layers {nodes:6d} nodes {med * 1000:8.1f} ms {med / nodes * 1e6:7.1f} us/node")


if __name__ == "__main__":
    main()
