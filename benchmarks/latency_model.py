"""The GAP8 latency models against DORY's published GAP8 cycles: calibration and held-out validation.

    python benchmarks/latency_model.py            # the report (about a minute)
    python benchmarks/latency_model.py --fit      # refit the fitted constants on the fit set (needs scipy)
    python benchmarks/latency_model.py --json     # the same rows as JSON

Measurements: DORY's regression networks on GAP8 (GVSOC, 8 cores, 8-bit PULP-NN, double-buffered L2->L1 tiles
as DORY generated them in 2021), see `dory_regression_nets.py`. Each network runs on the `gap8` target with the
regression's settings (L1 and L2 budgets, BNRelu bits, double buffering 2); the rows say which figures fitted
`gap8-tiled`'s fitted constants (`PulpConstants`: requant, requant_64, tile_overhead, layer_overhead) and which
are held out. MAC/cycle uses DORY's MAC count (a residual add counts C*C*H*W) so it compares with DORY's
README figures; `gap8-analytic` is the previous kernel-only model, for comparison. Pooling and residual-add
layers are not modelled (DORY counts their cycles).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import duccio_fx  # noqa: E402
from dory_regression_nets import NETWORKS, Measured  # noqa: E402
from duccio_fx import zoo  # noqa: E402
from duccio_fx.costs.program import plain_costs  # noqa: E402
from duccio_fx.ir.meta import LayerTerm, layer_terms  # noqa: E402
from duccio_fx.targets import Target, load_target  # noqa: E402

FIT_SET = ("MobileNetV2-128", "Residual-2", "SmartAgri", "Dronet-no-pool")
FITTED = ("requant", "requant_64", "tile_overhead", "layer_overhead")
BOUNDS = ((0.0, 100.0), (0.0, 100.0), (0.0, 10000.0), (0.0, 10000.0))  # cycles; fixed costs <= 0.1 ms at 100 MHz


def regression_target(m: Measured, model: str = "gap8-tiled", constants: dict[str, float] | None = None) -> Target:
    """`gap8` with the settings DORY's regression ran this network with."""
    tg = load_target("gap8")
    memory = tuple(level.model_copy(update={"reserved": level.size - {"L1": m.l1, "L2": m.l2}[level.name]})
                   if level.name in ("L1", "L2") else level for level in tg.memory)
    return tg.model_copy(update={
        "memory": memory, "bits": tg.bits.model_copy(update={"requant": m.bnrelu_bits}),
        "latency": tg.latency.model_copy(update={"model": model, "constants": constants or {}}),
        "deployment": tg.deployment.model_copy(update={"double_buffering": 2})})


_TERMS: dict[str, list[LayerTerm]] = {}


def terms_of(m: Measured) -> list[LayerTerm]:
    if m.name not in _TERMS:
        model, x = m.build()
        _TERMS[m.name] = layer_terms(duccio_fx.analyze(model, x))
    return _TERMS[m.name]


def predicted_cycles(m: Measured, model: str = "gap8-tiled", constants: dict[str, float] | None = None) -> float:
    return float(plain_costs(terms_of(m), regression_target(m, model, constants)).cycles)


def rows(constants: dict[str, float] | None = None) -> list[dict[str, Any]]:
    out = []
    for m in NETWORKS:
        cycles = predicted_cycles(m, constants=constants)
        analytic = predicted_cycles(m, "gap8-analytic")
        out.append({"network": m.name, "use": "fit" if m.name in FIT_SET else "held out",
                    "dory_macs": m.dory_macs, "measured_cycles": m.cycles, "predicted_cycles": round(cycles),
                    "error": cycles / m.cycles - 1, "analytic_error": analytic / m.cycles - 1,
                    "measured_mac_per_cycle": m.dory_macs / m.cycles, "readme_mac_per_cycle": m.readme,
                    "predicted_mac_per_cycle": m.dory_macs / cycles})
    return out


def fit() -> dict[str, float]:
    """Least squares of log(predicted / measured) over the fit set, for the fitted constants."""
    import numpy as np
    from scipy.optimize import least_squares
    fit_nets = [m for m in NETWORKS if m.name in FIT_SET]

    def residuals(x: Any) -> Any:
        constants = dict(zip(FITTED, map(float, x)))
        return np.array([np.log(predicted_cycles(m, constants=constants) / m.cycles) for m in fit_nets])

    lo, hi = zip(*BOUNDS)
    result = least_squares(residuals, np.array([20.0, 20.0, 500.0, 5000.0]), bounds=(lo, hi), diff_step=1e-3)
    return dict(zip(FITTED, (round(float(v), 1) for v in result.x)))


def user_targets() -> list[dict[str, Any]]:
    """What `duccio-fx inspect zoo:<model> --target gap8` predicts (today's DORY GAP8 target: no double buffering)."""
    out = []
    for name in ("dscnn", "mobilenet_v1", "resnet8", "mobilenet_v2"):
        model, x = zoo.build(name)
        costs = plain_costs(layer_terms(duccio_fx.analyze(model, x)), load_target("gap8"))
        out.append({"model": f"zoo:{name}", "macs": costs.macs, "cycles": round(costs.cycles),
                    "mac_per_cycle": costs.macs / costs.cycles, "latency_ms": costs.latency_s * 1e3})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", action="store_true", help="refit the fitted constants on the fit set (scipy)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    constants = None
    if args.fit:
        constants = fit()
        print("fitted on", ", ".join(FIT_SET), "->", constants)
    table, users = rows(constants), user_targets()
    if args.json:
        print(json.dumps({"networks": table, "gap8_target": users}, indent=1))
        return
    print(f"{'network':16} {'use':8} {'measured':>11} {'gap8-tiled':>11} {'error':>7} {'analytic':>8} "
          f"{'MAC/c meas':>10} {'README':>6} {'pred':>5}")
    for r in table:
        readme = f"{r['readme_mac_per_cycle']:.2f}" if r["readme_mac_per_cycle"] else "-"
        print(f"{r['network']:16} {r['use']:8} {r['measured_cycles']:11,} {r['predicted_cycles']:11,} "
              f"{100 * r['error']:+6.1f}% {100 * r['analytic_error']:+7.0f}% {r['measured_mac_per_cycle']:10.2f} "
              f"{readme:>6} {r['predicted_mac_per_cycle']:5.2f}")
    held = [abs(r["error"]) for r in table if r["use"] == "held out"]
    print(f"held out: {len(held)} networks, worst |error| {100 * max(held):.1f}%, "
          f"mean {100 * sum(held) / len(held):.1f}%")
    print("\ngap8 target as shipped (today's DORY: blocking DMA, no double buffering, 32-bit k/l):")
    for u in users:
        print(f"  {u['model']:18} {u['macs']:12,.0f} MACs {u['cycles']:12,} cycles {u['mac_per_cycle']:5.2f} MAC/cycle "
              f"{u['latency_ms']:8.2f} ms")


if __name__ == "__main__":
    main()
