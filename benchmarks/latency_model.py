"""How far the GAP8 analytic latency model is from DORY's measured whole-network MAC/cycle.

    python benchmarks/latency_model.py [--target gap8]

Measured figures (DORY's regression tests on GAP8, int8, 8 cores): MobileNetV1 8.76, DS-CNN 2.98,
MobileNetV2 3.86 MAC/cycle. The model counts only PULP-NN kernel cycles (plus an L3 charge for layers
that overflow L2): no DMA, tiling, pooling, residual adds or first-layer special cases.
"""

from __future__ import annotations

import argparse

import duccio_fx
from duccio_fx import zoo
from duccio_fx.costs.program import plain_costs
from duccio_fx.costs.terms import evaluate, value
from duccio_fx.ir.meta import layer_terms
from duccio_fx.costs.latency import LATENCY_MODELS
from duccio_fx.targets import load_target

MEASURED = {"mobilenet_v1": 8.76, "dscnn": 2.98, "mobilenet_v2": 3.86}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="gap8")
    args = parser.parse_args()
    target = load_target(args.target)
    print(f"{'model':14} {'MACs':>12} {'cycles':>12} {'kernel-only':>12} {'model MAC/c':>11} {'DORY MAC/c':>10} {'off by':>7}")
    for name, measured in MEASURED.items():
        model, x = zoo.build(name)
        values = evaluate(layer_terms(duccio_fx.analyze(model, x)))
        costs = plain_costs([v.term for v in values], target)
        macs = sum(value(v.macs) for v in values)
        kernel = sum(value(LATENCY_MODELS[target.latency.model](v, target)) for v in values)
        rate = macs / value(costs["cycles"])
        print(f"{name:14} {macs:12,.0f} {value(costs['cycles']):12,.0f} {kernel:12,.0f} {rate:11.2f} "
              f"{measured:10.2f} {100 * (rate / measured - 1):+6.0f}%")


if __name__ == "__main__":
    main()
