"""Constraints: a cost metric, a bound (absolute with units, or a percentage of the seed) and a scope.

    Constraint.parse("size", "50%")                 # at most half the seed's bytes on the target
    Constraint.parse("macs", "2M")                  # at most 2 M MACs per sample
    Constraint.parse("latency", "5ms")              # the target's latency model
    Constraint.parse("layer_memory", "L2", scope="layer3.0.conv1")   # that layer fits L2

Metrics read `SearchableModel.costs(target)`: `size` (bytes stored at the target's bit widths), `params`,
`macs`, `latency` (seconds), `layer_memory` (bytes of one layer as DORY counts them). A bound is resolved
to an absolute number once, against the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from duccio_fx.errors import DuccioError
from duccio_fx.units import parse_bytes, parse_count, parse_time

METRICS: dict[str, tuple[str, Callable[[object], float], str]] = {
    # name: (unit, parser of absolute bounds, example)
    "size": ("B", lambda v: float(parse_bytes(v)), "64kB"),
    "params": ("", parse_count, "30k"),
    "macs": ("MAC", parse_count, "2M"),
    "latency": ("s", parse_time, "5ms"),
    "layer_memory": ("B", lambda v: float(parse_bytes(v)), "380kB"),
}
NEEDS_TARGET = {"size", "latency", "layer_memory"}


class ConstraintError(DuccioError):
    """A constraint that cannot be parsed or met."""


@dataclass(frozen=True)
class Constraint:
    """`metric <= bound` over the whole model, or over one layer (`scope`)."""

    metric: str
    bound: float  # absolute, or a fraction of the seed when `relative`
    relative: bool = False
    scope: str | None = None  # a layer name for per-layer metrics
    text: str = ""  # as the user wrote it

    @classmethod
    def parse(cls, metric: str, text: str | float, scope: str | None = None, option: str | None = None) -> Constraint:
        where = option or f"constraint on {metric}"
        if metric not in METRICS:
            raise ConstraintError(f"unknown metric {metric!r}", where=where, fix=f"use one of: {', '.join(METRICS)}")
        if metric == "layer_memory" and not scope:
            raise ConstraintError("a layer_memory constraint needs a layer", where=where,
                                  fix="pass scope='<layer name>' (names as in `duccio-fx inspect`)")
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                fraction = float(raw[:-1]) / 100
                if not 0 < fraction:
                    raise ValueError(f"{raw!r}: a percentage must be > 0")
                return cls(metric, fraction, True, scope, raw)
            value = METRICS[metric][1](text)
        except ValueError as err:
            raise ConstraintError(f"bad bound for {metric}: {err}", where=where,
                                  fix=f"write an absolute bound such as '{METRICS[metric][2]}' or a percentage "
                                      f"of the seed such as '50%'") from None
        if value <= 0:
            raise ConstraintError(f"bound for {metric} must be > 0, got {raw!r}", where=where)
        return cls(metric, value, False, scope, raw)

    @property
    def label(self) -> str:
        return f"{self.metric}[{self.scope}]" if self.scope else self.metric

    def value(self, costs: dict[str, Any]) -> Any:
        """This constraint's metric in `costs` (from `SearchableModel.costs(target)`)."""
        key = {"size": "size_bytes", "latency": "latency_s"}.get(self.metric, self.metric)
        if self.metric == "layer_memory":
            layers = costs.get("layer_bytes")
            if layers is None:
                raise ConstraintError("layer_memory needs a target", fix="pass a target (e.g. 'gap8')")
            if self.scope not in layers:
                raise ConstraintError(f"no conv/linear layer named {self.scope!r}", where=f"constraint {self.label}",
                                      fix=f"use one of: {', '.join(layers)}")
            return layers[self.scope]
        if key not in costs:
            raise ConstraintError(f"the {self.metric} metric needs a target", where=f"constraint {self.label}",
                                  fix="pass a target (e.g. --target gap8) to measure bytes and latency")
        return costs[key]

    def resolve(self, seed_costs: dict[str, Any]) -> float:
        """The absolute bound (a percentage applies to the seed's value)."""
        return self.bound * float(self.value(seed_costs)) if self.relative else self.bound

    def describe(self, absolute: float) -> str:
        unit = METRICS[self.metric][0]
        shown = f"{absolute * 1e3:.4g} ms" if unit == "s" else f"{absolute:,.0f}{(' ' + unit) if unit else ''}"
        return f"{self.label} <= {shown}" + (f" ({self.text} of seed)" if self.relative else "")


def layerwise_constraints(critical: dict[str, str], target: Any) -> list[Constraint]:
    """One `layer_memory <= usable level size` constraint per critical layer ({layer: level})."""
    return [Constraint("layer_memory", float(target.level(level).usable), False, layer, f"{level} usable")
            for layer, level in critical.items()]
