"""`Costs`: every cost of one architecture, built in one place from its layer values.

The search method builds it from the sampled architecture (tensors, differentiable), the analysis from a
plain model (numbers); constraints, the objective, the feasibility check and the reports read it through
the metric registry (`duccio_fx.costs.metrics`). It is also a read-only mapping with the keys users of
`SearchableModel.costs()` know (`costs["params"]`, `costs["size_bytes"]`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Iterator, Mapping, Sequence

import torch

from duccio_fx.costs.latency import layer_cycles
from duccio_fx.costs.memory import constrained_layer_bytes, layer_parameter_bytes, overflow_bytes
from duccio_fx.costs.terms import LayerValues, Number, TermTable, value
from duccio_fx.targets import Target

PerLayer = Mapping[str, Number]


class LayerTable(Mapping[str, Number]):
    """Per-layer values as a view of one column of the vectorised costs: reading a layer indexes the column
    (nothing is computed per layer until it is read), `floats()` reads the whole column at once."""

    __slots__ = ("index", "column")

    def __init__(self, index: Mapping[str, int], column: torch.Tensor) -> None:
        self.index, self.column = index, column

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.column[self.index[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def floats(self) -> dict[str, float]:
        values = self.column.detach().tolist()
        return {name: values[i] for name, i in self.index.items()}

    def __repr__(self) -> str:
        return f"LayerTable({self.floats()})"


# the mapping keys: the whole-model figures and the per-layer tables users read by name
_KEYS = ("params", "macs", "layer_memory", "size_bytes", "layer_bytes", "layer_cycles", "cycles", "latency_s",
         "overflow_bytes")


@dataclass(frozen=True, eq=True)
class Costs(Mapping[str, Any]):
    """Costs of one architecture: model totals, per-layer tables and, with a target, its target costs.

    `layer_memory` is paper eq. 12 in elements (weights + input + output activations); `layer_bytes` is the
    same layer as the deployment tool counts it at the target's bit widths (DORY's accounting);
    `overflow_bytes` is, per layer-wise memory level, the bytes by which layers exceed it (L2V on GAP8).
    Target fields are None without a target.
    """

    params: Number
    macs: Number
    layer_params: PerLayer
    layer_macs: PerLayer
    layer_memory: PerLayer
    target: str | None = None
    size_bytes: Number | None = None
    layer_size_bytes: PerLayer | None = None
    layer_bytes: PerLayer | None = None
    layer_cycles: PerLayer | None = None
    layer_latency_s: PerLayer | None = None
    cycles: Number | None = None
    latency_s: Number | None = None
    overflow_bytes: PerLayer | None = None

    # -- mapping view ----------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in _KEYS or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (k for k in _KEYS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    # -- conversions -----------------------------------------------------------------------------------
    def floats(self) -> Costs:
        """The same costs as plain Python floats (detached), for decisions, logs and reports."""
        def conv(x: Any) -> Any:
            if isinstance(x, LayerTable):
                return x.floats()
            if isinstance(x, Mapping):
                return {k: value(v) for k, v in x.items()}
            return x if x is None or isinstance(x, str) else value(x)

        return replace(self, **{f.name: conv(getattr(self, f.name)) for f in fields(self)})

    def tensors(self) -> Costs:
        """The same costs as float64 tensors (numbers become constants)."""
        def conv(x: Any) -> Any:
            if isinstance(x, LayerTable):
                return x
            if isinstance(x, Mapping):
                return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in x.items()}
            return x if x is None or isinstance(x, str) else torch.as_tensor(x, dtype=torch.float64)

        return replace(self, **{f.name: conv(getattr(self, f.name)) for f in fields(self)})


def build_costs(values: LayerValues, target: Target | None = None, layer_weights: torch.Tensor | None = None
                ) -> Costs:
    """The one place costs are built, from the values of every layer at once (the columns of a
    `TermTable`): totals are sums of columns, per-layer tables are views of them. `layer_weights` scales every
    layer's contribution (a supernet's layers by the weight of their alternative, paper eq. 8; None: 1)."""
    table = values.term
    assert isinstance(table, TermTable), "build_costs takes the values of a TermTable (see CostProgram)"
    index = table.index

    def weighted(column: torch.Tensor) -> torch.Tensor:
        return column if layer_weights is None else column * layer_weights

    params, macs = weighted(values.params), weighted(values.macs)
    costs = Costs(params=params.sum(), macs=macs.sum(), layer_params=LayerTable(index, params),
                  layer_macs=LayerTable(index, macs), layer_memory=LayerTable(index, weighted(values.elements)))
    if target is None:
        return costs
    size = weighted(layer_parameter_bytes(values, target))
    cycles = weighted(layer_cycles(values, target))
    total_cycles = cycles.sum()
    return replace(costs, target=target.name, size_bytes=size.sum(), layer_size_bytes=LayerTable(index, size),
                   layer_bytes=LayerTable(index, weighted(constrained_layer_bytes(values, target))),
                   layer_cycles=LayerTable(index, cycles),
                   layer_latency_s=LayerTable(index, cycles / float(target.compute.clock)),
                   cycles=total_cycles, latency_s=total_cycles / float(target.compute.clock),
                   overflow_bytes=overflow_bytes(values, target, layer_weights))
