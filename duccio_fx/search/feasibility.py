"""Infeasible targets are refused before training: the smallest cost the search space allows, and what the
layers the search cannot shrink cost (those whose share of the metric is the same at the smallest
architecture as in the seed: frozen groups, grouped convs, inputs/outputs). Reads only the search-space
protocol, so it holds for every search method."""

from __future__ import annotations

from typing import Sequence

from duccio_fx.search.constraints import ConstraintError, ResolvedConstraint
from duccio_fx.search.space import SearchSpace
from duccio_fx.targets import Target, load_target


def check_feasible(space: SearchSpace, constraints: Sequence[ResolvedConstraint],
                   target: Target | str | None = None) -> dict[str, float]:
    """The minimum of every constrained metric; raises ConstraintError naming the first bound below it.
    `target`: a Target, a target name or a TOML path."""
    target = load_target(target) if target is not None else None
    low_costs = space.minimum_costs(target)
    seed_costs = space.cost_values(target)
    minima = {}
    for c in constraints:
        low = float(c.value(low_costs))
        minima[c.label] = low
        if c.bound < low * (1 - 1e-9):
            metric = c.constraint.measure
            at_min, at_seed = metric.layers(low_costs), metric.layers(seed_costs)
            fixed = sorted(((x, name) for name, x in at_min.items()
                            if (c.scope is None or name == c.scope) and x >= at_seed.get(name, x) * (1 - 1e-12)),
                           reverse=True)
            fixed_total = sum(x for x, _ in fixed)
            parts = ", ".join(f"'{name}' ({metric.describe(x)})" for x, name in fixed[:4] if x > 0)
            why = (f"layers the search cannot shrink cost {metric.describe(fixed_total)} of it (largest: {parts})"
                   if parts else "every layer is already at its smallest there (one channel per group, or the "
                                 "cheapest alternative)")
            raise ConstraintError(
                f"{c.describe()} cannot be met: the smallest {c.label} this search space allows is "
                f"{metric.describe(low)} (its smallest architecture); {why}",
                where=f"constraint {c.label}" + (f" ({c.text})" if c.text else ""),
                fix=f"relax the bound to at least {metric.pasteable(low)}, or make the frozen layers searchable "
                    "(see the frozen reasons in `duccio-fx inspect`)")
    return minima
