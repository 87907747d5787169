"""The DUCCIO paper's experiments, scaled to a 2-core CPU, on Fashion-MNIST (ResNet-8 seed, GAP8).

    python benchmarks/paper/run.py [--out runs/paper] [--train 4000] [--val 1000] [--epochs 2,6,2]
                                   [--seeds 0,1] [--workers 2] [--only fig4,fig7,fig8,seed]
                                   [--methods mask,path] [--sizes 25%,50%,75%] [--ops none,25%,50%,75%]

  fig4  the grid of the paper's Fig. 4: size 25/50/75 % x ops none/25/50/75 % of the size-only run's MACs,
        mask and path (or --methods, e.g. path,path+mask; --sizes and --ops run part of the grid), every
        seed (`duccio-fx sweep`)
  fig7  the penalty ablation (Fig. 7): max(0, R - T) (DUCCIO) vs |R - T| at 25/50/75 % size, mask, seed 0
  fig8  the λ ablation (Fig. 8): the λ ramp vs constant λ from 1e-6 to 1 at 50 % size
  seed  the seed trained for the same number of epochs (W + S + F) as a search, per seed: the reference

Every search is an ordinary `duccio-fx optimize` run directory (resumable; finished runs are skipped when
the script runs again). It ends by printing markdown tables and copying the Pareto picture next to this file.
Data: the first `--train` training and `--val` test images (FMNIST_TRAIN / FMNIST_VAL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent.parent / "examples" / "fashion_mnist.py"
LAMBDAS = (1e-6, 1e-5, 1e-4, 0.001, 0.01, 1.0)  # the ramp ends at L̂ / |R̂ - T|, 1.9e-5 at 50 % here


def optimize(out: Path, args: argparse.Namespace, *options: str) -> dict:
    if not (out / "report.json").exists():
        cmd = [sys.executable, "-m", "duccio_fx.cli", "optimize", str(EXAMPLE), "--target", "gap8", "--epochs",
               args.epochs, "--out", str(out), "--cache", str(args.out / "cache"), "--device", "cpu", *options]
        if (out / "checkpoint.pt").exists():
            cmd.append("--resume")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "optimize.log", "a") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    report = out / "report.json"
    return json.loads(report.read_text()) if report.exists() else {"status": "failed"}


def train_seed(seed: int, args: argparse.Namespace) -> float:
    """The seed alone, trained with the recipe's optimizer for W + S + F epochs: the accuracy to compare with."""
    path = args.out / "seed" / f"seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())["val_metric"]
    sys.path.insert(0, str(EXAMPLE.parent))
    import fashion_mnist as fm

    torch.manual_seed(seed)
    epochs = sum(int(e) for e in args.epochs.split(","))
    accuracy = train_and_evaluate(fm.build_model(), seed, epochs, fm)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "epochs": epochs, "val_metric": accuracy}))
    return accuracy


def train_and_evaluate(model: torch.nn.Module, seed: int, epochs: int, fm: Any) -> float:
    """Train `model` with the recipe's optimizer for `epochs` epochs on the example's data; its validation
    accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        torch.manual_seed(seed * 1000 + epoch)
        model.train()
        for x, y in fm.train_loader():
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in fm.val_loader())
    return hits / len(fm.val_loader().dataset)


def fig4(args: argparse.Namespace) -> list[dict]:
    out = args.out / "fig4"
    subprocess.run([sys.executable, "-m", "duccio_fx.cli", "sweep", str(EXAMPLE), "--target", "gap8", "--size",
                    args.sizes, "--ops", args.ops, "--method", args.methods, "--seeds", args.seeds,
                    "--epochs", args.epochs, "--workers", str(args.workers), "--out", str(out), "--device", "cpu"])
    whole = (args.methods, args.sizes, args.ops) == ("mask,path", "25%,50%,75%", "none,25%,50%,75%")
    if whole and (out / "pareto.png").exists():  # (part of the grid does not replace the picture of all of it)
        shutil.copy(out / "pareto.png", HERE / "fig4_pareto.png")
    return json.loads((out / "sweep.json").read_text())["points"]


def ablations(args: argparse.Namespace) -> tuple[dict, dict]:
    jobs: dict[tuple[str, str], tuple[Path, tuple[str, ...]]] = {}
    for size in ("25%", "50%", "75%"):
        for form in ("max", "abs"):
            jobs[("fig7", f"{form} {size}")] = (args.out / "fig7" / f"{form}-size{size[:-1]}",
                                                ("--max-size", size, "--form", form))
    jobs[("fig8", "ramp")] = (args.out / "fig8" / "ramp", ("--max-size", "50%"))
    for lam in LAMBDAS:
        jobs[("fig8", f"constant {lam:g}")] = (args.out / "fig8" / f"constant-{lam:g}",
                                               ("--max-size", "50%", "--constant-lambda", str(lam)))
    with ThreadPoolExecutor(args.workers) as pool:
        futures = {key: pool.submit(optimize, out, args, *options) for key, (out, options) in jobs.items()}
    reports = {key: f.result() for key, f in futures.items()}
    return ({k[1]: r for k, r in reports.items() if k[0] == "fig7"},
            {k[1]: r for k, r in reports.items() if k[0] == "fig8"})


def _row(r: dict) -> str:
    if r.get("status") == "failed" or "final" not in r:
        return "failed | | |"
    c = r["constraints"][0]
    return (f"{'met' if r['status'] == 'met' else 'VIOLATED'} | {r['final']['size_bytes']:,.0f} "
            f"(bound {c['bound']:,.0f}) | {r['final']['macs']:,.0f} | {r['final']['val_metric']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper"))
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--epochs", default="2,6,2")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="seed,fig4,fig7,fig8")
    parser.add_argument("--methods", default="mask,path", help="fig4: the search methods")
    parser.add_argument("--sizes", default="25%,50%,75%", help="fig4: the size targets")
    parser.add_argument("--ops", default="none,25%,50%,75%", help="fig4: the ops targets")
    args = parser.parse_args()
    os.environ.update(FMNIST_TRAIN=str(args.train), FMNIST_VAL=str(args.val))
    only = set(args.only.split(","))
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    seed_acc = {s: train_seed(s, args) for s in seeds} if "seed" in only else {}
    print(f"Fashion-MNIST, first {args.train} training / {args.val} test images, epochs {args.epochs}, "
          f"seeds {args.seeds}")
    if seed_acc:
        print(f"seed ResNet-8 trained {sum(int(e) for e in args.epochs.split(','))} epochs: "
              + ", ".join(f"seed {s}: {a:.3f}" for s, a in seed_acc.items()))
    if "fig4" in only:
        points = fig4(args)
        print("\n| method | points met in one shot | size target | ops target | size B (mean) | MACs (mean) "
              "| accuracy (mean over seeds) | vs seed (points) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        reference = statistics.mean(seed_acc.values()) if seed_acc else None
        for method in args.methods.split(","):
            mine = [p for p in points if p["method"] == method]
            met = sum(p["status"] == "met" for p in mine)
            for size in ("25%", "50%", "75%"):
                for ops in (None, "25%", "50%", "75%"):
                    cell = [p for p in mine if p["size"] == size and p["ops"] == ops and p["val_metric"] is not None]
                    if not cell:
                        continue
                    acc = statistics.mean(p["val_metric"] for p in cell)
                    delta = f"{(acc - reference) * 100:+.1f}" if reference is not None else ""
                    print(f"| {method} | {met}/{len(mine)} | {size} | {ops or 'none'} | "
                          f"{statistics.mean(p['size_bytes'] for p in cell):,.0f} | "
                          f"{statistics.mean(p['macs'] for p in cell):,.0f} | {acc:.3f} | {delta} |")
    if {"fig7", "fig8"} & only:
        fig7, fig8 = ablations(args)
        print("\n| penalty (Fig. 7) | status | size B | MACs | accuracy |\n| --- | --- | --- | --- | --- |")
        for key, r in fig7.items():
            print(f"| {key} | {_row(r)} |")
        print("\n| λ at 50 % size (Fig. 8) | status | size B | MACs | accuracy |\n| --- | --- | --- | --- | --- |")
        for key, r in fig8.items():
            print(f"| {key} | {_row(r)} |")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
