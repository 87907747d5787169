"""One `duccio-fx optimize` run per target and method on the real MNIST digits of the example; prints seed
vs result, and with several methods a side-by-side table (the paper's Table II layout).

    python benchmarks/optimize_mnist.py [--epochs 3,8,3] [--out runs/bench] [--methods mask,path]
                                        [--runs size25,size50,size75] [--seeds 0,1,2]

Targets: size 25 %, 50 %, 75 % of the seed's bytes on GAP8, and size 50 % combined with MACs 40 %. The
warmup is cached after the first run of a method and reused by its others (same model, data and seed).
With several `--seeds` the table gives each cell's mean accuracy and every seed's (the validation set has
1,000 digits, so one run's accuracy has a standard error of about 0.5 points at 0.97).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RUNS = {"size25": ["--max-size", "25%"], "size50": ["--max-size", "50%"], "size75": ["--max-size", "75%"],
        "size50+ops40": ["--max-size", "50%", "--max-ops", "40%"]}
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="3,8,3")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--methods", default="mask", help="comma-separated search methods")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in args.methods.split(","):
        for name in args.runs.split(","):
            for seed in seeds:
                label = run_label(method, name, seed)
                out = args.out / label
                if not (out / "report.json").exists():
                    code = subprocess.run([sys.executable, "-m", "duccio_fx.cli", "optimize", str(EXAMPLE),
                                           "--target", "gap8", *RUNS[name], "--epochs", args.epochs, "--method",
                                           method, "--seed", str(seed), "--out", str(out)],
                                          stdout=subprocess.DEVNULL).returncode
                    if code not in (0, 3):
                        sys.exit(f"{label}: optimize failed with exit code {code}")
                rows.append((label, json.loads((out / "report.json").read_text())))
    seed = rows[0][1]["seed"]
    print(f"seed: {seed['params']:,.0f} params, {seed['size_bytes']:,.0f} B, {seed['macs']:,.0f} MACs, "
          f"{seed['latency_s'] * 1e3:.2f} ms on GAP8, val accuracy after warmup {seed['val_metric_after_warmup']:.3f}")
    print(f"{'run':22} {'status':8} {'bytes':>8} {'MACs':>10} {'ms':>6} {'acc before FT':>13} {'acc':>6} "
          f"{'seconds':>8}")
    for name, r in rows:
        f = r["final"]
        print(f"{name:22} {r['status']:8} {f['size_bytes']:8,.0f} {f['macs']:10,.0f} {f['latency_s'] * 1e3:6.2f} "
              f"{f['val_metric_before_finetune']:13.3f} {f['val_metric']:6.3f} {sum(r['phase_seconds'].values()):8.0f}")
        for c in r["constraints"]:
            print(f"    {c['description']}: final {c['final']:,.0f} -> {'met' if c['met'] else 'VIOLATED'}")
    methods = args.methods.split(",")
    if len(methods) > 1:
        by = {label: r for label, r in rows}
        print("\n| target | " + " | ".join(f"{m} size B | {m} MACs | {m} GAP8 ms | {m} acc" for m in methods) + " |")
        print("| --- |" + " --- | --- | --- | --- |" * len(methods))
        for name in args.runs.split(","):
            cells = []
            for m in methods:
                finals = [by[run_label(m, name, seed)]["final"] for seed in seeds]
                accuracy = f"{statistics.mean(f['val_metric'] for f in finals):.3f}"
                if len(seeds) > 1:
                    accuracy += " (" + ", ".join(f"{f['val_metric']:.3f}" for f in finals) + ")"
                mean = {k: statistics.mean(f[k] for f in finals) for k in ("size_bytes", "macs", "latency_s")}
                cells.append(f"{mean['size_bytes']:,.0f} | {mean['macs']:,.0f} | {mean['latency_s'] * 1e3:.2f} | "
                             f"{accuracy}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def run_label(method: str, run: str, seed: int) -> str:
    """The run's directory name: `size50`, `path-size50`, `path-size50-seed1` (seed 0 keeps the plain name)."""
    label = run if method == "mask" else f"{method}-{run}"
    return label if seed == 0 else f"{label}-seed{seed}"


if __name__ == "__main__":
    main()
