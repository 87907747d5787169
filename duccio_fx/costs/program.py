"""Costs compiled for a training step: every layer's kept channels from one flat mask vector, then every
cost as a few vector expressions over all layers (`TermTable`), whatever the model's depth.

A searchable model's masks are one flat vector (the groups one after another). A layer's kept input and
output channels are sums over slices of it, so the program lists, once, which entries of the flat vector
count toward which layer (`channel`, `slot`, `block`) and what the frozen channels add (`constant`); a step
is then `constant.index_add(slot, masks[channel] * block)`: one gather and one scatter for all layers. The
bilinear costs (weights, MACs, params, bytes) follow in one product (`duccio_fx.costs.bilinear`), and the
other formulas of `duccio_fx.costs` (a cycle model) run once on the columns. The result equals evaluating layer by layer
(values exactly; gradients up to float rounding of their sums), with a number of ops that does not grow with
the depth, no per-layer Python work and no host sync: what GPUs need.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from duccio_fx.costs.bilinear import BilinearCosts
from duccio_fx.costs.model import Costs, build_costs
from duccio_fx.costs.terms import LayerValues, TermTable
from duccio_fx.ir.meta import LayerTerm
from duccio_fx.targets import Target


class CostProgram:
    """`terms` compiled against searchable channel groups (`groups`: (group id, channels) in the order of
    the flat mask vector). Channels of any other group are always kept."""

    def __init__(self, terms: Sequence[LayerTerm], groups: Sequence[tuple[int, int]] = (),
                 device: torch.device | str | None = None) -> None:
        self.terms = list(terms)
        self.groups = list(groups)
        self.table = TermTable(self.terms, device)
        offsets, start = {}, 0
        for gid, size in self.groups:
            offsets[gid] = start
            start += size
        self.channels = start
        layers = len(self.terms)
        constant = [0] * (2 * layers)
        channel: list[torch.Tensor] = []
        slot: list[int] = []
        block: list[int] = []
        for i, t in enumerate(self.terms):
            for side, spec in enumerate((t.in_spec, t.out_spec)):
                row = side * layers + i
                for group, lo, hi, size in spec:
                    if group in offsets:
                        channel.append(torch.arange(offsets[group] + lo, offsets[group] + hi))
                        slot.extend([row] * (hi - lo))
                        block.extend([size] * (hi - lo))
                    else:
                        constant[row] += (hi - lo) * size
        device = self.table.device
        self.constant = torch.tensor(constant, dtype=torch.float64, device=device)
        self.channel = (torch.cat(channel) if channel else torch.zeros(0, dtype=torch.long)).to(device)
        self.slot = torch.tensor(slot, dtype=torch.long, device=device)
        self.block = torch.tensor(block, dtype=torch.float64, device=device)
        self._copies: dict[torch.device, CostProgram] = {device: self}
        self._fits: dict[str | None, BilinearCosts] = {}  # per target

    def on(self, device: torch.device) -> CostProgram:
        """This program with its constants on `device` (made once per device)."""
        if device not in self._copies:
            self._copies[device] = CostProgram(self.terms, self.groups, device)
        return self._copies[device]

    def flatten(self, masks: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """A flat float64 mask vector from 0/1 vectors by group id (a group not given: all kept)."""
        parts = [torch.as_tensor(masks[gid], dtype=torch.float64) if gid in masks else
                 torch.ones(size, dtype=torch.float64) for gid, size in self.groups]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def counts(self, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's kept input and output channels; `masks` the flat 0/1 vector (None: all kept).
        Entries past the groups' channels (e.g. a trailing constant 1) are ignored."""
        program = self if masks is None else self.on(masks.device)
        counts = program.constant
        if masks is not None and len(program.channel):
            kept = masks.to(torch.float64).index_select(0, program.channel) * program.block
            counts = counts.index_add(0, program.slot, kept)
        layers = len(self.terms)
        return counts[:layers], counts[layers:]

    def values(self, masks: torch.Tensor | None = None, target: Target | None = None,
               weight_bits: torch.Tensor | None = None, in_bits: torch.Tensor | None = None,
               out_bits: torch.Tensor | None = None) -> LayerValues:
        """Every layer's values as columns, with the bilinear costs for `target` computed in one product;
        `weight_bits`, `in_bits`, `out_bits`: every layer's precisions as a search samples them (None: the
        layers' own)."""
        program = self if masks is None else self.on(masks.device)
        key = target.name if target is not None else None
        if key not in program._fits:
            program._fits[key] = BilinearCosts(program.table, target)
        return program._fits[key].values(*self.counts(masks), weight_bits, in_bits, out_bits)

    def costs(self, masks: torch.Tensor | None = None, target: Target | None = None,
              weight_bits: torch.Tensor | None = None, in_bits: torch.Tensor | None = None,
              out_bits: torch.Tensor | None = None, layer_weights: torch.Tensor | None = None) -> Costs:
        """The costs of the architecture `masks` (and the precisions) select, differentiable w.r.t. all;
        `layer_weights` scales each layer's contribution (a supernet's alternatives by their g)."""
        return build_costs(self.values(masks, target, weight_bits, in_bits, out_bits), target, layer_weights)


def plain_costs(terms: Sequence[LayerTerm], target: Target | None = None) -> Costs:
    """Costs of layers with every channel kept, as Python floats (analysis, reports, the exported model)."""
    return CostProgram(terms).costs(None, target).floats()
