"""Train fixed architectures of the path method's space from scratch, as `run.py` trains the seed reference:
how good a point of the space is, apart from how well a search trains it.

    python benchmarks/paper/train_fixed.py [--epochs 10] [--seed 0] [--train 4000] [--val 1000]
                                           [--example fashion_mnist|mnist]
                                           ["stage3.conv1=dwsep3,stage3.conv2=dwsep3" ...]

Each argument is one architecture (`point=alternative` pairs; points not named keep the seed's block; no
argument: the seed and the path method's Fashion-MNIST results). Prints size on GAP8 and validation accuracy.
`--example mnist` trains on the MNIST example's data instead (its own 4 000 / 1 000 split; --train and --val
apply to Fashion-MNIST only), e.g. with `--epochs 14`, the epochs of `optimize_mnist.py`'s searches.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch

import duccio_fx
from duccio_fx.targets import load_target

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples"
DEFAULT = ("", "stage3.conv1=dwsep3,stage3.conv2=dwsep3", "stage3.conv2=dwsep3",
           "stage2.conv1=dwsep3,stage2.conv2=dwsep3,stage3.conv2=dwsep3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=list(DEFAULT))
    parser.add_argument("--epochs", type=int, default=10, help="W + S + F of the searches it compares with")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--example", choices=("fashion_mnist", "mnist"), default="fashion_mnist",
                        help="the example whose seed and data to train (examples/NAME.py)")
    args = parser.parse_args()
    os.environ.setdefault("FMNIST_TRAIN", str(args.train))
    os.environ.setdefault("FMNIST_VAL", str(args.val))
    sys.path[:0] = [str(EXAMPLES), str(HERE)]
    fm = importlib.import_module(args.example)
    from run import train_and_evaluate

    gap8 = load_target("gap8")
    example = next(iter(fm.train_loader()))[0][:2]
    seed_size = duccio_fx.measure_costs(fm.build_model(), (example[:1],), gap8).size_bytes
    spaces = []  # every architecture checked before any trains
    for arch in args.archs:
        pairs = [pair.split("=", 1) for pair in arch.split(",") if pair]
        if any(len(p) != 2 for p in pairs):
            parser.error(f"{arch!r}: write each choice as point=alternative, e.g. stage3.conv2=dwsep3")
        space = duccio_fx.make_searchable(fm.build_model(), example, method="path")
        try:
            space.set_choices({**{info.point: p.names[0] for info, p in zip(space.infos, space.points())},
                               **dict(pairs)})
        except duccio_fx.DuccioError as err:
            parser.error(f"{arch!r}: {err}")
        spaces.append((arch, space))
    for arch, space in spaces:
        size = space.cost_values(gap8).size_bytes
        model = space.export()
        torch.manual_seed(args.seed)
        for m in model.modules():  # from scratch, as the seed reference
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        started = time.perf_counter()
        accuracy = train_and_evaluate(model, args.seed, args.epochs, fm)
        print(f"{arch or 'seed':70} {size:8,.0f} B ({size / seed_size:4.0%}) accuracy {accuracy:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
