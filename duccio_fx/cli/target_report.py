"""What `inspect --target` adds: each layer's bytes, memory level, cycles and criticality on a target."""

from __future__ import annotations

import math
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table
from torch.fx import GraphModule

from duccio_fx.common.units import human_bytes
from duccio_fx.costs.memory import (critical_layers, critical_slack, layer_activation_bytes, layer_parameter_bytes,
                                    placement)
from duccio_fx.costs.program import plain_costs
from duccio_fx.costs.terms import LayerValues, evaluate
from duccio_fx.ir.meta import LayerTerm, layer_terms
from duccio_fx.targets import Target

DEFAULT_SLACKS = (0.3, 0.6, 0.9)


def target_report(model: GraphModule | Sequence[LayerTerm], target: Target,
                  slacks: Sequence[float] = DEFAULT_SLACKS) -> dict[str, Any]:
    """Per-layer memory (DORY's accounting), level, cycles and critical slacks of an analysed model (or of
    its layer terms)."""
    terms = layer_terms(model) if isinstance(model, GraphModule) else list(model)
    values = evaluate(terms)
    costs = plain_costs(terms, target)
    critical = {c: critical_layers(values, target, c) for c in slacks}
    layers = []
    for v in values:
        name = v.term.name
        layers.append({
            "name": name, "kind": v.term.kind,
            "parameter_bytes": float(layer_parameter_bytes(v, target, accounting=True)),
            "activation_bytes": float(layer_activation_bytes(v, target)),
            "bytes": costs.layer_bytes[name],
            "level": placement(v, target),
            "cycles": costs.layer_cycles[name],
            "macs": float(v.macs),
            "critical_from": _slack(v, target),
        })
    macs = sum(x["macs"] for x in layers)
    return {
        "target": target.name,
        "levels": [{"name": m.name, "size": m.size, "usable": m.usable, "layerwise": m.layerwise}
                   for m in target.memory],
        "layers": layers,
        "totals": {
            "size_bytes": costs.size_bytes, "cycles": costs.cycles, "latency_ms": costs.latency_s * 1e3,
            "macs_per_cycle": macs / costs.cycles if costs.cycles else 0.0,
            "overflow_bytes": costs.overflow_bytes,
            "layers_per_level": {lvl: sum(x["level"] == lvl for x in layers)
                                 for lvl in [m.name for m in target.memory] + ["none"]},
            "critical": {str(c): critical[c] for c in slacks},
        },
    }


def _slack(v: LayerValues, target: Target) -> float | None:
    """The smallest --layerwise C that makes this layer critical (rounded up to 3 decimals), if any."""
    found = critical_slack(v, target)
    return None if found is None else math.ceil(found[1] * 1000 - 1e-9) / 1000


def render_target_report(report: dict[str, Any], console: Console) -> None:
    levels = ", ".join(f"{m['name']} {human_bytes(m['usable'])} usable" for m in report["levels"])
    table = Table(title=f"on target {report['target']} ({levels}): layer memory as DORY counts it")
    for col, justify in (("layer", "left"), ("kind", "left"), ("weights+consts B", "right"), ("activations B", "right"),
                         ("total B", "right"), ("level", "left"), ("critical from C", "right"), ("cycles", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    style = {"none": "bold red"}
    last = report["levels"][-1]["name"]
    for x in report["layers"]:
        level = x["level"]
        shown = f"[{style.get(level, 'red' if level == last else 'green')}]{level}[/]"
        table.add_row(x["name"], x["kind"], f"{x['parameter_bytes']:,.0f}", f"{x['activation_bytes']:,.0f}",
                      f"{x['bytes']:,.0f}", shown,
                      "" if x["critical_from"] is None else f"{x['critical_from']:g}", f"{x['cycles']:,.0f}")
    console.print(table)
    t = report["totals"]
    overflow = ", ".join(f"{k}V {v:,.0f} B" for k, v in t["overflow_bytes"].items())
    per_level = ", ".join(f"{n} in {k}" for k, n in t["layers_per_level"].items() if n)
    console.print(f"[bold]on {report['target']}[/]: size {t['size_bytes']:,.0f} B ({human_bytes(t['size_bytes'])}), "
                  f"{t['cycles']:,.0f} cycles = {t['latency_ms']:.3f} ms, {t['macs_per_cycle']:.2f} MAC/cycle; "
                  f"layers: {per_level}" + (f"; overflow {overflow}" if overflow else ""))
    for c, layers in t["critical"].items():
        console.print(f"  critical at C = {c}: {len(layers)} layer(s)"
                      + (": " + ", ".join(f"{k} ({v})" for k, v in layers.items()) if layers else ""))
