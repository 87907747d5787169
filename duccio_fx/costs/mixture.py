"""Costs of a supernet: fixed layers plus one option per choice point, weighted by the option weights.

A path-based search picks one option (a small block of layers) at every choice point. With a one-hot
weight vector per point (the Gumbel sample), `weighted(w)` is exactly the costs of the picked architecture,
and differentiable w.r.t. `w` (paper eq. 8: Σ_i g_i · cost_i); with probabilities it is the expected cost.
Every per-layer table is indexed by the layers' names in the exported model, so a layer-wise constraint on
a layer of one option reads `w_option · bytes`: zero when the option is not picked.

The costs of each option are constants (an option's channels do not change), computed once per target by
`build_costs`, so a training step only does one multiply-add per field.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from duccio_fx.costs.model import Costs, build_costs
from duccio_fx.costs.terms import LayerValues
from duccio_fx.targets import Target

_TOTALS = ("params", "macs", "size_bytes", "cycles", "latency_s")
_TABLES = ("layer_params", "layer_macs", "layer_memory", "layer_size_bytes", "layer_bytes", "layer_cycles",
           "layer_latency_s")


class CostMixture:
    """`fixed` layers, and per choice point the layer values of each of its options (in option order)."""

    def __init__(self, fixed: Sequence[LayerValues], points: Sequence[Sequence[Sequence[LayerValues]]],
                 target: Target | None = None) -> None:
        self.target = target
        self.fixed = build_costs(list(fixed), target).floats()
        self.options = [build_costs(list(values), target).floats() for point in points for values in point]
        self.point_of: list[int] = [p for p, point in enumerate(points) for _ in point]
        self.sizes = [len(point) for point in points]
        self._columns = {f: torch.tensor([_get(o, f) for o in self.options], dtype=torch.float64)
                         for f in _TOTALS if getattr(self.fixed, f) is not None}
        self._levels = list(self.fixed.overflow_bytes or {})
        for level in self._levels:
            self._columns["overflow:" + level] = torch.tensor([o.overflow_bytes[level] for o in self.options],
                                                              dtype=torch.float64)
        self._entries: dict[str, tuple[list[str], torch.Tensor, torch.Tensor]] = {}
        for f in _TABLES:
            if getattr(self.fixed, f) is None:
                continue
            names, owners, values = [], [], []
            for i, o in enumerate(self.options):
                for name, v in getattr(o, f).items():
                    names.append(name)
                    owners.append(i)
                    values.append(v)
            self._entries[f] = (names, torch.tensor(owners, dtype=torch.long),
                                torch.tensor(values, dtype=torch.float64))

    @property
    def width(self) -> int:
        """Length of the weight vector: options of every point, point after point."""
        return len(self.options)

    def weighted(self, weights: torch.Tensor) -> Costs:
        """Fixed costs + Σ_options weight · option costs (tensors, differentiable w.r.t. `weights`)."""
        w = weights.to(torch.float64)
        fields: dict[str, object] = {}
        for f, column in self._columns.items():
            if not f.startswith("overflow:"):
                fields[f] = _get(self.fixed, f) + w @ column.to(w.device)
        if self._levels:
            fields["overflow_bytes"] = {
                lv: self.fixed.overflow_bytes[lv] + w @ self._columns["overflow:" + lv].to(w.device)
                for lv in self._levels}
        for f, (names, owners, values) in self._entries.items():
            table = {k: torch.as_tensor(v, dtype=torch.float64, device=w.device)
                     for k, v in getattr(self.fixed, f).items()}
            table.update(zip(names, (w[owners.to(w.device)] * values.to(w.device)).unbind()))
            fields[f] = table
        return replace(self.fixed, **fields)

    def least(self) -> Costs:
        """Per metric, the smallest value any pick allows: each point at its cheapest option for that metric."""
        fields: dict[str, object] = {}
        for f, column in self._columns.items():
            total = _get(self.fixed, f) if not f.startswith("overflow:") else self.fixed.overflow_bytes[f[9:]]
            start = 0
            for size in self.sizes:
                total += float(column[start:start + size].min()) if size else 0.0
                start += size
            fields[f] = total
        if self._levels:
            fields["overflow_bytes"] = {lv: fields.pop("overflow:" + lv) for lv in self._levels}
        for f, (names, owners, values) in self._entries.items():
            table = dict(getattr(self.fixed, f))
            for name, owner, v in zip(names, owners.tolist(), values.tolist()):
                table[name] = v if self.sizes[self.point_of[owner]] == 1 else 0.0
            fields[f] = table
        return replace(self.fixed, **fields)


def _get(costs: Costs, field: str) -> float:
    return float(getattr(costs, field))
