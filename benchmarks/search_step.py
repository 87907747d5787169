"""Training-step time of the search methods vs the plain seed, measured in one run.

    python benchmarks/search_step.py [--steps 30] [--reps 5]

For ResNet-8 (32x32, batch 64) and DS-CNN (49x10, batch 100): the same batch, the same optimizer
(Adam), forward + backward + step, for the plain seed, the mask search, and the path search with the
"all" estimator (every alternative runs, the paper's) and the "sampled" one (only the sampled alternative
runs). DS-CNN's choice points are its 1x1 pointwise convs, against which the default alternatives are
9x (conv3) and 25x (conv5) the work, so it is also timed with the narrower set NARROW ("path-narrow",
sampled estimator). A search step also computes the differentiable costs and adds a size penalty, as a real search
step does. Timings interleave seed and searchable runs and report the
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

NARROW = "conv1,dwsep3,identity"  # alternatives no costlier than the pointwise seed's block (but dwsep3's 3x3)


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
            if isinstance(search, duccio_fx.PathSpace):
                search.resample()  # each step's costs use that step's sample
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
        models = {"seed": seed, "mask": search,
                  "path-all": duccio_fx.make_searchable(seed, x[:1], method="path", estimator="all"),
                  "path-sampled": duccio_fx.make_searchable(seed, x[:1], method="path", estimator="sampled")}
        if name == "dscnn":
            models["path-narrow"] = duccio_fx.make_searchable(seed, x[:1], method="path", estimator="sampled",
                                                              alternatives=NARROW)
        for key, model in models.items():  # warm-up
            step_time(model, x, y, 3, key != "seed")
        times: dict[str, list[float]] = {key: [] for key in models}
        for _ in range(args.reps):  # interleaved, so drifts in machine speed hit every variant alike
            for key, model in models.items():
                times[key].append(step_time(model, x, y, args.steps, key != "seed"))
        p = statistics.median(times["seed"])
        parts = [f"seed {p * 1000:6.1f} ms"]
        for key in list(models)[1:]:
            ratios = [b / a for a, b in zip(times["seed"], times[key])]
            parts.append(f"{key} {statistics.median(times[key]) * 1000:6.1f} ms = {statistics.median(ratios):.2f}x "
                         f"({min(ratios):.2f}..{max(ratios):.2f})")
        print(f"{name:8s} batch {batch:3d}: " + ", ".join(parts))
        for key in list(models)[1:]:
            print(f"    {key}: costs+backward {cost_time(models[key], None, args.reps) * 1000:.2f} ms, with gap8 "
                  f"{cost_time(models[key], 'gap8', args.reps) * 1000:.2f} ms")


if __name__ == "__main__":
    main()
