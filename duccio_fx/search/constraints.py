"""Constraints: a cost metric, a bound (absolute with units, or a percentage of the seed) and a scope.

    Constraint.parse("size", "50%")                 # at most half the seed's bytes on the target
    Constraint.parse("macs", "2M")                  # at most 2 M MACs per sample
    Constraint.parse("latency", "5ms")              # the target's latency model
    Constraint.parse("layer_memory", "L2", scope="layer3.0.conv1")   # that layer fits L2

Metrics come from the metric registry (`duccio_fx.costs.metrics`). A bound is resolved to an absolute
number once, against the seed: `c.resolve(seed_costs)` gives a `ResolvedConstraint`, which is what the
objective, the feasibility check, the recipe and the reports carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.metrics import Metric, MetricError, get_metric
from duccio_fx.targets import Target


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
        try:
            m = get_metric(metric)
        except MetricError as err:
            raise ConstraintError(str(err), where=where, fix=err.fix) from None
        if m.scoped and not scope:
            raise ConstraintError(f"a {metric} constraint needs a layer", where=where,
                                  fix="pass scope='<layer name>' (names as in `duccio-fx inspect`)")
        raw = str(text).strip()
        try:
            if raw.endswith("%"):
                fraction = float(raw[:-1]) / 100
                if not 0 < fraction:
                    raise ValueError(f"{raw!r}: a percentage must be > 0")
                return cls(metric, fraction, True, scope, raw)
            value = m.parse(text)
        except ValueError as err:
            raise ConstraintError(f"bad bound for {metric}: {err}", where=where,
                                  fix=f"write an absolute bound such as '{m.example}' or a percentage "
                                      f"of the seed such as '50%'") from None
        if value <= 0:
            raise ConstraintError(f"bound for {metric} must be > 0, got {raw!r}", where=where)
        return cls(metric, value, False, scope, raw)

    @property
    def label(self) -> str:
        return f"{self.metric}[{self.scope}]" if self.scope else self.metric

    @property
    def measure(self) -> Metric:
        return get_metric(self.metric)

    def value(self, costs: Any) -> Any:
        """This constraint's metric in `costs` (a `Costs`, or a mapping with the same names)."""
        try:
            return self.measure.value(costs, self.scope)
        except MetricError as err:
            raise ConstraintError(str(err), where=f"constraint {self.label}", fix=err.fix) from None

    def resolve(self, seed_costs: Any) -> ResolvedConstraint:
        """This constraint with its absolute bound (a percentage applies to the seed's value)."""
        bound = self.bound * float(self.value(seed_costs)) if self.relative else self.bound
        return ResolvedConstraint(self, bound)

    def at(self, bound: float) -> ResolvedConstraint:
        """This constraint with the absolute bound `bound`."""
        return ResolvedConstraint(self, float(bound))


@dataclass(frozen=True)
class ResolvedConstraint:
    """A constraint with its absolute bound T: `R(costs) <= T`."""

    constraint: Constraint
    bound: float

    @property
    def metric(self) -> str:
        return self.constraint.metric

    @property
    def scope(self) -> str | None:
        return self.constraint.scope

    @property
    def label(self) -> str:
        return self.constraint.label

    @property
    def text(self) -> str:
        return self.constraint.text

    def value(self, costs: Any) -> Any:
        return self.constraint.value(costs)

    def violation(self, costs: Any) -> float:
        """R − T as a float (> 0 means violated)."""
        return float(self.value(costs)) - self.bound

    def met(self, costs: Any) -> bool:
        return self.violation(costs) <= 1e-9 * max(1.0, abs(self.bound))

    def describe(self) -> str:
        c = self.constraint
        return f"{c.label} <= {c.measure.describe(self.bound)}" + (f" ({c.text} of seed)" if c.relative else "")

    def __float__(self) -> float:
        return self.bound


def layerwise_constraints(critical: dict[str, str], target: Target) -> list[ResolvedConstraint]:
    """One `layer_memory <= usable level size` constraint per critical layer ({layer: level})."""
    return [Constraint("layer_memory", float(target.level(level).usable), False, layer, f"{level} usable").at(
        float(target.level(level).usable)) for layer, level in critical.items()]
