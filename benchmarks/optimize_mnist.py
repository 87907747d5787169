"""One `duccio-fx optimize` run per target on the real MNIST digits of the example; prints seed vs result.

    python benchmarks/optimize_mnist.py [--epochs 3,8,3] [--out runs/bench]

Targets: size 25 %, 50 %, 75 % of the seed's bytes on GAP8, and size 50 % combined with MACs 40 %. The
warmup is cached after the first run and reused by the others (same model, data and seed).
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    rows = []
    for name, bounds in RUNS.items():
        out = args.out / name
        if not (out / "report.json").exists():
            code = subprocess.run([sys.executable, "-m", "duccio_fx.cli", "optimize", str(EXAMPLE), "--target", "gap8",
                                   *bounds, "--epochs", args.epochs, "--out", str(out)],
                                  stdout=subprocess.DEVNULL).returncode
            if code not in (0, 2):
                sys.exit(f"{name}: optimize failed with exit code {code}")
        r = json.loads((out / "report.json").read_text())
        rows.append((name, r))
    seed = rows[0][1]["seed"]
    print(f"seed: {seed['params']:,.0f} params, {seed['size_bytes']:,.0f} B, {seed['macs']:,.0f} MACs, "
          f"{seed['latency_s'] * 1e3:.2f} ms on GAP8, val accuracy after warmup {seed['val_metric_after_warmup']:.3f}")
    print(f"{'run':14} {'status':8} {'bytes':>8} {'MACs':>10} {'ms':>6} {'acc before FT':>13} {'acc':>6} {'seconds':>8}")
    for name, r in rows:
        f = r["final"]
        print(f"{name:14} {r['status']:8} {f['size_bytes']:8,.0f} {f['macs']:10,.0f} {f['latency_s'] * 1e3:6.2f} "
              f"{f['val_metric_before_finetune']:13.3f} {f['val_metric']:6.3f} {sum(r['phase_seconds'].values()):8.0f}")
        for c in r["constraints"]:
            print(f"    {c['description']}: final {c['final']:,.0f} -> {'met' if c['met'] else 'VIOLATED'}")


if __name__ == "__main__":
    main()
