"""Training-step time of a SearchableModel (mask search) vs the plain seed, measured in one run.

    python benchmarks/search_step.py [--steps 30] [--reps 5]

For ResNet-8 (32x32, batch 64) and DS-CNN (49x10, batch 100): the same batch, the same optimizer
(Adam), forward + backward + step. The searchable step also computes the differentiable costs and adds a
size penalty, as a real search step does. Timings interleave seed and searchable runs and report the
median of --reps repetitions of --steps steps each; the figure that matters is the ratio. It also times
what the search adds by itself, the costs and their backward pass (`costs()` and `costs("gap8")`), which
does not depend on the noise of the convolutions.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import duccio_fx
from duccio_fx import zoo


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, searchable: bool) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if searchable:
            loss = loss + 1e-6 * torch.relu(model.costs()["params"] - 1000)
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def cost_time(search: duccio_fx.SearchSpace, target: str | None, reps: int) -> float:
    """Median seconds of costs(target) + backward of one cost, as a search step does it."""
    hw = duccio_fx.load_target(target) if target else None
    key = "size_bytes" if hw is not None else "params"
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(20):
            search.zero_grad(set_to_none=True)
            search.costs(hw)[key].backward()
        times.append((time.perf_counter() - start) / 20)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, batch, classes in (("resnet8", 64, 10), ("dscnn", 100, 12)):
        seed, x = zoo.build(name, batch=batch)
        y = torch.randint(0, classes, (batch,))
        search = duccio_fx.make_searchable(seed, x[:1])
        for model, s in ((seed, False), (search, True)):  # warm-up
            step_time(model, x, y, 3, s)
        plain, masked = [], []
        for _ in range(args.reps):
            plain.append(step_time(seed, x, y, args.steps, False))
            masked.append(step_time(search, x, y, args.steps, True))
        p, m = statistics.median(plain), statistics.median(masked)
        ratios = [b / a for a, b in zip(plain, masked)]
        print(f"{name:8s} batch {batch:3d}: seed {p * 1000:6.1f} ms/step, searchable {m * 1000:6.1f} ms/step, "
              f"ratio {m / p:.3f} (per-rep ratios {min(ratios):.2f}..{max(ratios):.2f}); costs+backward "
              f"{cost_time(search, None, args.reps) * 1000:.2f} ms, with gap8 {cost_time(search, 'gap8', args.reps) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
