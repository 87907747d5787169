"""Costs of a supernet: fixed layers plus one option per choice point, weighted by the option weights.

A path-based search picks one option (a small block of layers) at every choice point. With a one-hot
weight vector per point (the Gumbel sample), `weighted(w)` is exactly the costs of the picked architecture,
and differentiable w.r.t. `w` (paper eq. 8: Σ_i g_i · cost_i); with probabilities it is the expected cost.
Every per-layer table is indexed by the layers' names in the exported model, so a layer-wise constraint on
a layer of one option reads `w_option · bytes`: zero when the option is not picked.

The costs of each option are constants (an option's channels do not change), computed once per target,
so a training step is one matrix product for the totals and one product for every per-layer table.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from duccio_fx.costs.model import Costs, LayerTable
from duccio_fx.costs.program import plain_costs
from duccio_fx.ir.meta import LayerTerm
from duccio_fx.targets import Target

_TOTALS = ("params", "macs", "size_bytes", "cycles")  # latency_s = cycles / clock
_TABLES = ("layer_params", "layer_macs", "layer_memory", "layer_size_bytes", "layer_bytes", "layer_cycles",
           "layer_latency_s")


class CostMixture:
    """`fixed` layers, and per choice point the layers of each of its options (in option order)."""

    def __init__(self, fixed: Sequence[LayerTerm], points: Sequence[Sequence[Sequence[LayerTerm]]],
                 target: Target | None = None) -> None:
        self.target = target
        self.fixed = plain_costs(fixed, target)
        self.options = [plain_costs(terms, target) for point in points for terms in point]
        self.point_of: list[int] = [p for p, point in enumerate(points) for _ in point]
        self.sizes = [len(point) for point in points]
        self.levels = list(self.fixed.overflow_bytes or {})
        # totals: one column per field (and per layer-wise level), one row per option
        self.totals = [f for f in _TOTALS if getattr(self.fixed, f) is not None]
        self.base = torch.tensor([*(getattr(self.fixed, f) for f in self.totals),
                                  *(self.fixed.overflow_bytes[lv] for lv in self.levels)], dtype=torch.float64)
        rows = [[*(getattr(o, f) for f in self.totals), *(o.overflow_bytes[lv] for lv in self.levels)]
                for o in self.options]
        self.matrix = torch.tensor(rows, dtype=torch.float64).reshape(len(self.options), len(self.base))
        # per-layer tables: fixed layers (weight 1) then every option's layers (weight of their option)
        self.tables = [f for f in _TABLES if getattr(self.fixed, f) is not None]
        names = list(self.fixed.layer_params) + [n for o in self.options for n in o.layer_params]
        self.index = {name: i for i, name in enumerate(names)}
        fixed_count = len(self.fixed.layer_params)
        # which weight scales each entry: the option's, or the trailing constant 1 for fixed layers
        self.owner = torch.tensor([len(self.options)] * fixed_count +
                                  [i for i, o in enumerate(self.options) for _ in o.layer_params], dtype=torch.long)
        self.entries = torch.tensor([[*getattr(self.fixed, f).values(), *(x for o in self.options
                                                                          for x in getattr(o, f).values())]
                                     for f in self.tables], dtype=torch.float64).reshape(len(self.tables), len(names))
        self._copies: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    @property
    def width(self) -> int:
        """Length of the weight vector: options of every point, point after point."""
        return len(self.options)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._copies:
            self._copies[device] = tuple(x.to(device) for x in (self.base, self.matrix, self.owner, self.entries))
        return self._copies[device]

    def weighted(self, weights: torch.Tensor) -> Costs:
        """Fixed costs + Σ_options weight · option costs (tensors, differentiable w.r.t. `weights`)."""
        base, matrix, owner, entries = self._on(weights.device)
        w = weights.to(torch.float64)
        totals = base + w @ matrix
        fields: dict[str, object] = dict(zip(self.totals, totals.unbind()))
        if self.target is not None:
            fields["latency_s"] = fields["cycles"] / self.target.compute.clock
        if self.levels:
            fields["overflow_bytes"] = dict(zip(self.levels, totals[len(self.totals):].unbind()))
        scaled = entries * torch.cat([w, w.new_ones(1)])[owner]
        fields.update({f: LayerTable(self.index, row) for f, row in zip(self.tables, scaled.unbind())})
        return replace(self.fixed, **fields)

    def least(self) -> Costs:
        """Per metric, the smallest value any pick allows: each point at its cheapest option for that metric."""
        lowest = self.base.clone()
        start = 0
        for size in self.sizes:
            if size:
                lowest += self.matrix[start:start + size].min(0).values
            start += size
        fields: dict[str, object] = dict(zip(self.totals, lowest.tolist()))
        if self.target is not None:
            fields["latency_s"] = fields["cycles"] / self.target.compute.clock
        if self.levels:
            fields["overflow_bytes"] = dict(zip(self.levels, lowest[len(self.totals):].tolist()))
        # a layer of an option counts only where its point has no other option
        only = [1.0] * len(self.fixed.layer_params) + [1.0 if self.sizes[self.point_of[i]] == 1 else 0.0
                                                       for i, o in enumerate(self.options) for _ in o.layer_params]
        for f, row in zip(self.tables, (self.entries * torch.tensor(only, dtype=torch.float64)).tolist()):
            fields[f] = {name: row[i] for name, i in self.index.items()}
        return replace(self.fixed, **fields)
