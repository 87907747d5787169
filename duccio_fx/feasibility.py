"""Infeasible targets are refused before training: the smallest cost the search space allows, and what the
parts the search cannot shrink (frozen groups, grouped convs, inputs/outputs) cost."""

from __future__ import annotations

from typing import Any, Sequence

from duccio_fx.constraints import Constraint, ConstraintError
from duccio_fx.cost_model import (LayerValues, as_float, evaluate, layer_bytes, layer_parameter_bytes, target_costs,
                                  value)
from duccio_fx.latency import layer_cycles
from duccio_fx.searchable import SearchableModel


def _contribution(c: Constraint, v: LayerValues, target: Any) -> float:
    if c.metric == "params":
        return value(v.params)
    if c.metric == "macs":
        return value(v.macs)
    if c.metric == "size":
        return value(layer_parameter_bytes(v, target))
    if c.metric == "latency":
        return value(layer_cycles(v, target)) / target.compute.clock
    return value(layer_bytes(v, target, target.layerwise_levels[0] if target.layerwise_levels else None))


def _is_frozen(v: LayerValues) -> bool:
    return all(index < 0 for index, *_ in v.term.in_spec + v.term.out_spec)


def minimum_costs(sm: SearchableModel, target: Any = None) -> tuple[dict[str, Any], list[LayerValues]]:
    values = evaluate(sm.terms, sm.minimum_masks())
    costs: dict[str, Any] = {"params": sum(value(v.params) for v in values),
                             "macs": sum(value(v.macs) for v in values)}
    if target is not None:
        costs.update(as_float(target_costs(values, target)))
    return costs, values


def check_feasible(sm: SearchableModel, constraints: Sequence[Constraint], bounds: Sequence[float],
                   target: Any = None) -> dict[str, float]:
    """The minimum of every constrained metric; raises ConstraintError naming the first bound below it."""
    costs, values = minimum_costs(sm, target)
    minima = {}
    for c, bound in zip(constraints, bounds):
        low = float(c.value(costs))
        minima[c.label] = low
        if bound < low * (1 - 1e-9):
            scoped = [v for v in values if c.scope is None or v.term.name == c.scope]
            frozen = sorted(((_contribution(c, v, target), v.term.name) for v in scoped if _is_frozen(v)),
                            reverse=True)
            frozen_total = sum(x for x, _ in frozen)
            parts = ", ".join(f"'{name}' ({x:,.4g})" for x, name in frozen[:4] if x > 0) or "none"
            raise ConstraintError(
                f"{c.describe(bound)} cannot be met: the smallest {c.label} this search space allows is "
                f"{low:,.6g} (every searchable channel group down to one channel); layers the search cannot "
                f"shrink cost {frozen_total:,.6g} of it (largest: {parts})",
                where=f"constraint {c.label}" + (f" ({c.text})" if c.text else ""),
                fix=f"relax the bound to at least {low:,.6g}, or make the frozen layers searchable "
                    "(see the frozen reasons in `duccio-fx inspect`)")
    return minima
