"""Most costs of a layer are bilinear in its kept channels: weights, MACs, params, elements and the bytes a
target stores or needs are each `a·cin·cout + b·cin + c·cout + d`, with a, b, c, d fixed per layer and
target. `BilinearCosts` finds those coefficients once, by evaluating the cost formulas themselves on a few
channel counts (so the formulas stay the one definition), checks them on two more, and then computes every
such quantity of every layer in one product: `[cin·cout, cin, cout] @ coefficients + constants`. The
results seed the `LayerValues` memo, so the formulas that are not bilinear (a cycle model with ceilings)
read them instead of recomputing: a step runs a handful of ops for all of them, whatever the depth.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from duccio_fx.costs.memory import bytes_key, layer_bytes, layer_parameter_bytes, parameter_bytes_key
from duccio_fx.costs.terms import LayerValues, Number, TermTable, values_of
from duccio_fx.targets import Target

_FIT = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))  # (cin, cout) at which the coefficients are read
_CHECK = ((3.0, 7.0), (6.0, 2.0))  # where the fit must reproduce the formula exactly


def quantities(target: Target | None) -> dict[Any, Callable[[LayerValues], Number]]:
    """The bilinear quantities: a memo key of `LayerValues` (or a field name) → how a formula computes it."""
    out: dict[Any, Callable[[LayerValues], Number]] = {
        "weights": lambda v: v.weights, "macs": lambda v: v.macs, "params": lambda v: v.params,
        "elements": lambda v: v.elements}
    if target is not None:
        out[parameter_bytes_key(target, False)] = lambda v: layer_parameter_bytes(v, target)
        for level in (None, *target.memory):  # levels holding the same things share one key
            out.setdefault(bytes_key(target, level), lambda v, level=level: layer_bytes(v, target, level))
    return out


class BilinearCosts:
    """The bilinear quantities of a `TermTable`'s layers for one target, as coefficients."""

    def __init__(self, table: TermTable, target: Target | None) -> None:
        self.table = table
        formulas = quantities(target)

        def columns(cin: float, cout: float) -> dict[Any, torch.Tensor]:
            v = values_of(table, table.zeros + cin, table.zeros + cout)
            return {k: table.zeros + f(v) for k, f in formulas.items()}

        at = [columns(*p) for p in _FIT]
        checks = [(p, columns(*p)) for p in _CHECK]
        self.keys: list[Any] = []
        coefficients, constants = [], []
        for key in formulas:
            d = at[0][key]
            b, c = at[1][key] - d, at[2][key] - d
            a = at[3][key] - b - c - d
            if all(torch.equal(a * x * y + b * x + c * y + d, got[key]) for (x, y), got in checks):
                self.keys.append(key)
                coefficients.append(torch.stack([a, b, c], 1))
                constants.append(d)
        layers = len(table)
        self.coefficients = torch.stack(coefficients, 2) if coefficients else table.zeros.new_zeros(layers, 3, 0)
        self.constants = torch.stack(constants, 1) if constants else table.zeros.new_zeros(layers, 0)

    def values(self, cin: torch.Tensor, cout: torch.Tensor, weight_bits: torch.Tensor | None = None,
               in_bits: torch.Tensor | None = None, out_bits: torch.Tensor | None = None) -> LayerValues:
        """The layers' values for these kept channels, every bilinear quantity computed in one product.
        `weight_bits`, `in_bits`, `out_bits`: each layer's precisions as a search samples them; the bytes then
        follow from the formulas (the coefficients hold the layers' own precisions)."""
        features = torch.stack([cin * cout, cin, cout], 1).unsqueeze(1)  # [layers, 1, 3]
        columns = torch.baddbmm(self.constants.unsqueeze(1), features, self.coefficients).squeeze(1).unbind(1)
        memo = dict(zip(self.keys, columns))
        if any(b is not None for b in (weight_bits, in_bits, out_bits)):
            memo = {k: c for k, c in memo.items() if isinstance(k, str)}  # the target's bytes depend on the bits
        weights = memo.pop("weights") if "weights" in memo else None
        macs = memo.pop("macs") if "macs" in memo else None
        if weights is None or macs is None:  # (not bilinear: a layer kind this fit does not cover)
            fallback = values_of(self.table, cin, cout)
            weights, macs = fallback.weights, fallback.macs
        return LayerValues(self.table, cin, cout, weights, macs, memo, weight_bits, in_bits, out_bits)
