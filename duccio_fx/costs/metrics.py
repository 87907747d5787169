"""The metric registry: what a constraint may bound, how its bound is written, and where `Costs` holds it.

    size          bytes stored at the target's bit widths (weights, biases, requantization constants)
    params        conv/linear weights + biases
    macs          multiply-accumulates per sample
    latency       seconds, from the target's latency model
    layer_memory  bytes of one layer as the deployment tool counts them (needs a layer: `scope`)

A new metric is one `register_metric(Metric(...))`: constraints, the objective, the feasibility check and
the reports find it by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from duccio_fx.common.units import parse_bytes, parse_count, parse_time


class MetricError(ValueError):
    """A metric that does not exist, or costs that do not hold it (e.g. bytes without a target)."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.fix = fix


@dataclass(frozen=True)
class Metric:
    """A cost a constraint can bound: `total` and `per_layer` name the `Costs` fields that hold it."""

    name: str
    unit: str  # "B", "MAC", "s" or "" (a count)
    parse: Callable[[object], float]  # an absolute bound as users write it ("64kB", "2M", "5ms")
    example: str
    total: str
    per_layer: str
    needs_target: bool = False
    scoped: bool = False  # a per-layer metric: a constraint on it names one layer

    def value(self, costs: Mapping[str, Any] | Any, scope: str | None = None) -> Any:
        """This metric in `costs` (the layer `scope`'s value for a scoped metric)."""
        if self.scoped:
            layers = _field(costs, self.per_layer)
            if layers is None:
                raise MetricError(f"{self.name} needs a target", "pass a target (e.g. --target gap8)")
            if scope not in layers:
                raise MetricError(f"no conv/linear layer named {scope!r}", f"use one of: {', '.join(layers)}")
            return layers[scope]
        total = _field(costs, self.total)
        if total is None:
            raise MetricError(f"the {self.name} metric needs a target",
                              "pass a target (e.g. --target gap8) to measure bytes and latency")
        return total

    def layers(self, costs: Any) -> dict[str, Any]:
        """Each layer's share of this metric ({} when the costs do not break it down)."""
        return dict(_field(costs, self.per_layer) or {})

    def describe(self, amount: float) -> str:
        """`1,234 B`, `2,000,000 MAC`, `4.2 ms`."""
        if self.unit == "s":
            return f"{amount * 1e3:.4g} ms"
        return f"{amount:,.0f}" + (f" {self.unit}" if self.unit else "")

    def pasteable(self, amount: float) -> str:
        """`amount` as a bound users can paste back (`19950B`, `3738368`, `303.4us`), rounded up so that
        it is never below `amount`."""
        if self.unit == "s":
            for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
                if amount < 1000 * scale or unit == "s":
                    return f"{math.ceil(amount / scale * 100 - 1e-9) / 100:g}{unit}"
        whole = math.ceil(amount - 1e-9)
        return f"{whole}B" if self.unit == "B" else str(whole)


def _field(costs: Any, name: str) -> Any:
    """A field of `Costs`, or a key of a plain mapping of the same names."""
    if isinstance(costs, Mapping) and not hasattr(costs, name):
        return costs.get(name)
    return getattr(costs, name, None)


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> None:
    METRICS[metric.name] = metric


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise MetricError(f"unknown metric {name!r}", f"use one of: {', '.join(METRICS)}")
    return METRICS[name]


def _bytes(v: object) -> float:
    return float(parse_bytes(v))


register_metric(Metric("size", "B", _bytes, "64kB", "size_bytes", "layer_size_bytes", needs_target=True))
register_metric(Metric("params", "", parse_count, "30k", "params", "layer_params"))
register_metric(Metric("macs", "MAC", parse_count, "2M", "macs", "layer_macs"))
register_metric(Metric("latency", "s", parse_time, "5ms", "latency_s", "layer_latency_s", needs_target=True))
register_metric(Metric("layer_memory", "B", _bytes, "380kB", "layer_bytes", "layer_bytes", needs_target=True,
                       scoped=True))
