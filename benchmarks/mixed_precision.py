"""Mixed precision under a size bound: 8-bit channel search vs weight-precision search vs both, on real data.

    python benchmarks/mixed_precision.py [--datasets mnist,fmnist] [--sizes 12.5,25,50] [--epochs 2,6,2]
                                         [--modes 8bit,bits,both] [--out runs/mixed] [--seed 0]

One `duccio-fx optimize ... --target gap8 --max-size S% --dory` per dataset, size bound and mode:
  8bit  the mask method (channels only, every weight at 8 bits)
  bits  `--bits 2,4,8 --bits-only` (every channel kept; each layer's weights at 8, 4 or 2 bits)
  both  `--bits 2,4,8` (channels and precisions together)
Datasets: `mnist` (examples/mnist.py, 4 000 / 1 000 real digits) and `fmnist` (examples/fashion_mnist.py
on the first 4 000 training and 1 000 test images, as the paper benchmark; needs `apt-get install
dataset-fashion-mnist`). Prints one markdown table: bytes, the float validation accuracy and the integer
accuracy of the DORY network (the one that would run), per run. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = {"mnist": ROOT / "examples" / "mnist.py", "fmnist": ROOT / "examples" / "fashion_mnist.py"}
MODES = {"8bit": [], "bits": ["--bits", "2,4,8", "--bits-only"], "both": ["--bits", "2,4,8"]}


def run(dataset: str, size: str, mode: str, args: argparse.Namespace) -> dict:
    out = args.out / dataset / f"size{size}-{mode}-s{args.seed}"
    if not (out / "report.json").exists():
        env = dict(os.environ, FMNIST_TRAIN="4000", FMNIST_VAL="1000")
        command = [sys.executable, "-m", "duccio_fx.cli", "optimize", str(EXAMPLES[dataset]), "--target", "gap8",
                   "--max-size", f"{size}%", "--epochs", args.epochs, "--seed", str(args.seed), "--dory",
                   "--out", str(out), *MODES[mode]]
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if done.returncode == 1 and "cannot be met" in done.stderr:  # the bound is under the space's smallest model
            return {"status": "refused", "why": " ".join(done.stderr.split())}
        if done.returncode not in (0, 3):
            sys.exit(f"{dataset} {size}% {mode}: optimize failed with exit code {done.returncode}: "
                     f"{' '.join(command)}\n{done.stderr}")
    return json.loads((out / "report.json").read_text())


def bits_text(report: dict) -> str:
    """How many searched layers ended at each width, e.g. '8:1 4:5 2:3'."""
    rows = [r["bits"] for r in report.get("weight_bits", []) if r["bits"] is not None]
    return " ".join(f"{b}:{rows.count(b)}" for b in (8, 4, 2) if rows.count(b)) or "all 8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fmnist")
    parser.add_argument("--sizes", default="12.5,25,50")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--epochs", default="2,6,2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/mixed"))
    args = parser.parse_args()
    print("| data | size bound | mode | status | size B | MACs | GAP8 ms | weight bits | float acc | integer acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dataset in args.datasets.split(","):
        for size in args.sizes.split(","):
            for mode in args.modes.split(","):
                r = run(dataset, size, mode, args)
                if r["status"] == "refused":
                    print(f"| {dataset} | {size} % | {mode} | refused before training: {r['why'][:160]} "
                          "| | | | | | |", flush=True)
                    continue
                f, acc = r["final"], r["dory"]["accuracy"]
                print(f"| {dataset} | {size} % | {mode} | {r['status']} | {f['size_bytes']:,.0f} | {f['macs']:,.0f} | "
                      f"{f['latency_s'] * 1e3:.2f} | {bits_text(r)} | {acc['float_accuracy']:.3f} | "
                      f"{acc['integer_accuracy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
