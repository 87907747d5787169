"""Training-step time of the search methods vs the plain seed, measured in one run.

    python benchmarks/search_step.py [--steps 30] [--reps 5] [--device cpu|cuda] [--models resnet8,dscnn]
                                     [--only-costs] [--json FILE]

For ResNet-8 (32x32, batch 64) and DS-CNN (49x10, batch 100): the same batch, the same optimizer
(Adam), forward + backward + step, for the plain seed, the mask search, and the path search with the
"all" estimator (every alternative runs, the paper's) and the "sampled" one (only the sampled alternative
runs), and the path+mask search (the same supernet with channel masks) with both estimators. DS-CNN's choice
points are its 1x1 pointwise convs, against which conv3 and conv5 are 9x and 25x the work: the default set
leaves them out since issue 22 (alternatives over 4x the seed block's MACs), and "path-narrow" names the
narrow set NARROW explicitly (sampled estimator), as before. "mask-bits" and "mask-bits-act" are the mask
search with `bits=(2, 4, 8)` (every layer's weights fake-quantized at 8, 4 and 2 bits, mixed by its Gumbel
g) and also `act_bits=(2, 4, 8)` (a PACT quantizer on every layer's output, at three widths each). A search
step also adds the space's penalty on its params (`penalty`: the path method's default "neighbours" costs
read every one-point flip), as a real search step does. Timings interleave seed and searchable runs and
report the median of --reps repetitions of --steps steps each; the figure that matters is the ratio. It also
times what the search adds by itself, the costs and their backward pass (`costs()` and `costs("gap8")`),
which does not depend on the noise of the convolutions, and for spaces with "neighbours" costs the size
penalty + backward with gap8.

Options:

  --models A,B,...  models to time (default resnet8,dscnn), from MODELS: resnet8 (batch 64), dscnn (batch 100),
                    mobilenet_v1 (96x96, batch 64), resnet18_64 (zoo resnet18 on a 64x64 input, batch 128) and
                    resnet50 (224x224, batch 8; only when named). The number of classes is read from the model's
                    output.
  --device cpu|cuda models, inputs and targets live there; on cuda the timers read after torch.cuda.synchronize().
  --only-costs      skip the whole-step timing: only the costs+backward times and op counts (fast, for big models).
  --json FILE       also write every figure (step times per repetition and their medians, ratios to the seed,
                    costs+backward times, op counts, device, torch version) as JSON, rewritten after each model.

Op counts: for every searchable variant, the aten ops of one `costs()` + backward of "params" and of one
`costs("gap8")` + backward of "size_bytes" (after one untimed warm-up call; a path space draws its sample
outside the counted region), counted with torch.profiler as the events named `aten::*` (nested ones
included); on cuda also the events that ran on the GPU (kernels, memcpy/memset). The script uses only
`make_searchable`, `.costs`, `.penalty` (where it exists), `PathSpace.resample`, `load_target` and
`zoo.build`, so it also runs against older commits for before/after figures: `git archive <commit>
duccio_fx passes targets | tar -x -C OLD`, move OLD/passes and OLD/targets into OLD/duccio_fx/ (the
installed layout), then run with PYTHONPATH=OLD (a plain PYTHONPATH to an old checkout still takes
duccio_fx.passes and .targets from the editable install).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import duccio_fx
from duccio_fx import zoo

NARROW = "conv1,dwsep3,identity"  # alternatives no costlier than the pointwise seed's block (but dwsep3's 3x3)

# name -> (zoo name, batch, per-sample input shape or None for the zoo's own)
MODELS: dict[str, tuple[str, int, tuple[int, ...] | None]] = {
    "resnet8": ("resnet8", 64, None),
    "dscnn": ("dscnn", 100, None),
    "mobilenet_v1": ("mobilenet_v1", 64, None),
    "resnet18_64": ("resnet18", 128, (3, 64, 64)),
    "resnet50": ("resnet50", 8, None),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_path(search: nn.Module) -> bool:
    path_space = getattr(duccio_fx, "PathSpace", None)
    return isinstance(search, path_space) if path_space is not None else hasattr(search, "resample")


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, searchable: bool) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        if searchable:
            loss = loss + penalty(model, None)
        loss.backward()
        opt.step()
    sync(x.device)
    return (time.perf_counter() - start) / steps


def penalty(search: nn.Module, target: Any) -> torch.Tensor:
    """A search step's penalty on size (with a target) or params, bound 1000, λ 1e-6: `search.penalty`, which
    with the path method's "neighbours" costs reads every one-point flip (a plain relu on `costs()` in commits
    without it)."""
    metric, key = ("size", "size_bytes") if target is not None else ("params", "params")
    if not hasattr(search, "penalty"):
        return 1e-6 * torch.relu(search.costs(target)[key] - 1000)
    objective = duccio_fx.DuccioObjective([duccio_fx.Constraint(metric, 1000.0).at(1000.0)], schedule="constant",
                                          constant_lambda=1e-6)
    return search.penalty(objective, target, 0.0)


def cost_call(search: nn.Module, target: str | None) -> tuple[Any, str]:
    hw = duccio_fx.load_target(target) if target else None
    return hw, ("size_bytes" if hw is not None else "params")


def cost_time(search: nn.Module, target: str | None, reps: int, device: torch.device,
              penalised: bool = False) -> float:
    """Median seconds of costs(target) + backward of one cost (with `penalised`, of the step's `penalty`), as a
    search step does it (drawing the path method's sample and clearing the architecture gradients are not
    timed)."""
    hw, key = cost_call(search, target)
    times = []
    for _ in range(reps):
        total = 0.0
        for _ in range(20):
            if is_path(search):
                search.resample()  # each step's costs use that step's sample
            for p in search.arch_parameters():
                p.grad = None
            sync(device)
            start = time.perf_counter()
            (penalty(search, hw) if penalised else search.costs(hw)[key]).backward()
            sync(device)
            total += time.perf_counter() - start
        times.append(total / 20)
    return statistics.median(times)


def op_count(search: nn.Module, target: str | None, device: torch.device) -> dict[str, int]:
    """aten ops (and on cuda, GPU events) of one costs(target) + backward of one cost."""
    hw, key = cost_call(search, target)

    def prepare() -> None:  # outside the counted region
        if is_path(search):
            search.resample()
        for p in search.arch_parameters():
            p.grad = None

    prepare()
    search.costs(hw)[key].backward()  # warm-up: caches built on the first call are not counted
    prepare()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        search.costs(hw)[key].backward()
        sync(device)
    events = prof.events()
    counts = {"aten_ops": sum(1 for e in events if e.name.startswith("aten::"))}
    if device.type == "cuda":
        counts["cuda_kernels"] = sum(1 for e in events if getattr(e, "device_type", None) == DeviceType.CUDA)
    return counts


def describe(ms: float, counts: dict[str, int]) -> str:
    extra = f", {counts['cuda_kernels']} cuda kernels" if "cuda_kernels" in counts else ""
    return f"{ms:.2f} ms ({counts['aten_ops']} aten ops{extra})"


def build(name: str, device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor, int]:
    """Seed (on the CPU), input and targets (on `device`) and the number of classes of MODELS[name]."""
    zoo_name, batch, shape = MODELS[name]
    seed, x = zoo.build(zoo_name, batch=batch)
    if shape is not None:
        x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    seed.eval()
    with torch.no_grad():
        try:
            out = seed(x[:1])
        except Exception as e:
            raise SystemExit(f"{name}: zoo model {zoo_name!r} does not accept an input of shape "
                             f"{tuple(x[:1].shape)}: {e}") from e
    out = out[0] if isinstance(out, (tuple, list)) else out
    classes = int(out.shape[-1])
    y = torch.randint(0, classes, (batch,))
    return seed, x.to(device), y.to(device), classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--models", default="resnet8,dscnn", help=f"comma list of: {', '.join(MODELS)}")
    parser.add_argument("--only-costs", action="store_true", help="skip the whole-step timing")
    parser.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    args = parser.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"--models: unknown {', '.join(unknown) or '(empty)'}; known: {', '.join(MODELS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
    device = torch.device(args.device)
    gpu = f", device cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")
    report: dict[str, Any] = {"torch": torch.__version__, "device": args.device,
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "threads": torch.get_num_threads(), "steps": args.steps, "reps": args.reps,
                              "only_costs": args.only_costs, "models": {}}
    for name in names:
        seed, x, y, classes = build(name, device)
        batch = x.shape[0]
        example = x[:1].cpu()  # every space is built on the CPU, then moved, as the recipe does
        models = {"seed": seed, "mask": duccio_fx.make_searchable(seed, example),
                  "path-all": duccio_fx.make_searchable(seed, example, method="path", estimator="all"),
                  "path-sampled": duccio_fx.make_searchable(seed, example, method="path", estimator="sampled")}
        try:  # mixed precision (`--bits`, `--act-bits`; absent from older commits)
            models["mask-bits"] = duccio_fx.make_searchable(seed, example, bits=(2, 4, 8))
            models["mask-bits-act"] = duccio_fx.make_searchable(seed, example, bits=(2, 4, 8), act_bits=(2, 4, 8))
        except (TypeError, duccio_fx.DuccioError):
            pass
        if "path+mask" in duccio_fx.search_methods():  # (absent from older commits)
            models["path+mask-all"] = duccio_fx.make_searchable(seed, example, method="path+mask", estimator="all")
            models["path+mask-sampled"] = duccio_fx.make_searchable(seed, example, method="path+mask",
                                                                    estimator="sampled")
        if name == "dscnn":
            models["path-narrow"] = duccio_fx.make_searchable(seed, example, method="path", estimator="sampled",
                                                              alternatives=NARROW)
        for model in models.values():
            model.to(device)
        fig: dict[str, Any] = {"zoo": MODELS[name][0], "batch": batch, "input_shape": list(x.shape[1:]),
                               "classes": classes, "step_ms": {}, "step_ms_median": {}, "ratio_median": {},
                               "ratio_min": {}, "ratio_max": {}, "costs": {}}
        report["models"][name] = fig
        if not args.only_costs:
            for key, model in models.items():  # warm-up
                step_time(model, x, y, 3, key != "seed")
            times: dict[str, list[float]] = {key: [] for key in models}
            for _ in range(args.reps):  # interleaved, so drifts in machine speed hit every variant alike
                for key, model in models.items():
                    times[key].append(step_time(model, x, y, args.steps, key != "seed"))
            p = statistics.median(times["seed"])
            parts = [f"seed {p * 1000:6.1f} ms"]
            fig["step_ms"] = {key: [t * 1000 for t in ts] for key, ts in times.items()}
            fig["step_ms_median"] = {key: statistics.median(ts) * 1000 for key, ts in times.items()}
            for key in list(models)[1:]:
                ratios = [b / a for a, b in zip(times["seed"], times[key])]
                fig["ratio_median"][key] = statistics.median(ratios)
                fig["ratio_min"][key], fig["ratio_max"][key] = min(ratios), max(ratios)
                parts.append(f"{key} {statistics.median(times[key]) * 1000:6.1f} ms = {statistics.median(ratios):.2f}x "
                             f"({min(ratios):.2f}..{max(ratios):.2f})")
            print(f"{name:8s} batch {batch:3d}: " + ", ".join(parts))
        else:
            print(f"{name:8s} batch {batch:3d}: costs only")
        for key in list(models)[1:]:
            model = models[key]
            plain_ops, gap8_ops = op_count(model, None, device), op_count(model, "gap8", device)
            plain_ms = cost_time(model, None, args.reps, device) * 1000
            gap8_ms = cost_time(model, "gap8", args.reps, device) * 1000
            fig["costs"][key] = {"params": {"ms": plain_ms, **plain_ops}, "gap8": {"ms": gap8_ms, **gap8_ops}}
            print(f"    {key}: costs+backward {describe(plain_ms, plain_ops)}, with gap8 {describe(gap8_ms, gap8_ops)}",
                  flush=True)
            if getattr(model, "cost_mode", None) == "neighbours":  # the penalty reads every one-point flip
                fig["costs"][key]["penalty_gap8_ms"] = ms = cost_time(model, "gap8", args.reps, device, True) * 1000
                print(f"    {key}: size penalty+backward with gap8 (neighbours costs) {ms:.2f} ms", flush=True)
        if args.json:  # after each model, so a later failure (e.g. out of memory) keeps what ran
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
