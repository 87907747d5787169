"""How long the path method's supernet insertion takes on real torchvision models, next to the analysis.

    python benchmarks/supernet_insertion_speed.py [--reps 3] [--size 64] [--models resnet18,densenet201]

For each model (random weights, 10 classes, batch 1 at SIZE x SIZE) it prints the number of choice points,
the seconds of the analysis (trace, shape propagation, channel analysis, layer costs) and the seconds of
the `supernet-insertion` pass alone (the default alternatives), each the median of --reps runs, and "init s":
the seconds torch takes just to fill the alternatives' new weights with random numbers (what their own
nn.Conv2d constructors do), a floor for any pass that builds the supernet (densenet201's alternatives add
about 510M weights). The insertion grows linearly with the number of choice points.
Needs torchvision (`pip install -e ".[test]"`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types

import torch

from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.passes.supernet_insertion import SupernetInsertion
from duccio_fx.pipeline import analyze
from duccio_fx.search.alternatives import AlternativeSelection

MODELS = ("resnet18", "resnet50", "densenet201", "mobilenet_v2", "regnet_y_400mf")


def torchvision_model(name: str) -> torch.nn.Module:
    # torchvision's meta registrations need torch's private ops of the same build; the models do not
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10).eval()


def time_init(count: int, reps: int) -> float:
    """Median seconds to fill `count` weights with uniform random numbers (in 16M chunks)."""
    chunk = torch.empty(min(count, 1 << 24))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for k in range(0, count, chunk.numel()):
            chunk[: min(chunk.numel(), count - k)].uniform_()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_insertion(model: torch.nn.Module, x: torch.Tensor, reps: int) -> tuple[int, float, float, int]:
    """(choice points, median analysis seconds, median insertion seconds, weights the alternatives add)."""
    analysis, insertion, points, added = [], [], 0, 0
    for _ in range(reps):
        work = copy.deepcopy(model)
        start = time.perf_counter()
        gm = analyze(work, x)
        analysis.append(time.perf_counter() - start)
        step = SupernetInsertion(analyze, AlternativeSelection.parse(None))
        start = time.perf_counter()
        PassContext().run(gm, [step])
        insertion.append(time.perf_counter() - start)
        points = len(step.points)
        added = sum(p.numel() for p in gm.parameters()) - sum(p.numel() for p in model.parameters())
        del gm, work
    return points, statistics.median(analysis), statistics.median(insertion), added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision model names")
    args = parser.parse_args()
    x = torch.randn(1, 3, args.size, args.size)
    print(f"{'model':<16}{'points':>8}{'analysis s':>12}{'insertion s':>13}{'ms/point':>10}{'new weights':>13}"
          f"{'init s':>9}")
    for name in args.models.split(","):
        points, analysis, insertion, added = time_insertion(torchvision_model(name), x, args.reps)
        per_point = 1000 * insertion / points if points else float("nan")
        print(f"{name:<16}{points:>8}{analysis:>12.3f}{insertion:>13.3f}{per_point:>10.1f}{added / 1e6:>12.1f}M"
              f"{time_init(added, args.reps):>9.3f}", flush=True)


if __name__ == "__main__":
    main()
