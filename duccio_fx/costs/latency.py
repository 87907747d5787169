"""Latency models: a layer's kept channels -> cycles on a target, differentiable on the searchable model.

A target names its model in `[latency] model = ...`; new models register with `register_latency_model`.

`gap8-analytic` is the analytic PULP-NN cycle model of the DUCCIO authors' code (Burrello et al., TETC 2023): int8 kernels
on the 8-core cluster, output pixels processed in blocks of 2 rows x 8 columns, with
  conv       ceil(Ho/2) * ceil(Wo/8) * (2*K*Cin + ceil(Cout/4) * (5 + 14*ceil(K*Cin/4) + 10))
  depthwise  4 * ceil(C/4) * Ho * Wo * K
  linear     ceil(Cin/2) * ceil(Cout/4)  (per position, for a linear over a sequence)
(K = kernel elements, Cin per group). It assumes every operand is already in L1: DMA, tiling overheads and
the first-layer/pooling/add kernels are not modelled. A layer that does not fit the target's last layer-wise
level (GAP8: L2) additionally pays its bytes once through the next level at that level's `bytes_per_cycle`.
`ceil` rounds in the forward pass and passes gradients straight through.

`gap8-tiled` (GAP8's and GAP9's default) models DORY's generated code: its L1 tiles, the PULP-NN kernel's
cycles per tile, the DMA and the fixed costs per tile and per layer (`duccio_fx.costs.pulp_tiled`).

`mac-rate` divides MACs by a sustained MAC/cycle per layer kind (generic microcontrollers).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from duccio_fx.costs.memory import layer_bytes
from duccio_fx.costs.pulp_tiled import tiled_cycles
from duccio_fx.costs.terms import LayerValues, Number, by_kind, select
from duccio_fx.targets import Target
from duccio_fx.targets.schema import register_latency_model_name

LatencyModel = Callable[[LayerValues, Target], Number]
LATENCY_MODELS: dict[str, LatencyModel] = {}


def register_latency_model(name: str) -> Callable[[LatencyModel], LatencyModel]:
    """Decorator: make a cycle model available to target files as `[latency] model = name`."""
    def add(fn: LatencyModel) -> LatencyModel:
        LATENCY_MODELS[name] = fn
        register_latency_model_name(name)
        return fn
    return add


def ceil_int(x: Number) -> Number:
    """ceil of a constant: an int for one layer, a column for a `TermTable` (no gradient needed)."""
    return torch.ceil(x) if isinstance(x, torch.Tensor) else math.ceil(x)


def ceil_ste(x: Number) -> Number:
    """ceil in the forward pass, identity gradient in the backward pass."""
    if isinstance(x, torch.Tensor):
        return x + (torch.ceil(x) - x).detach()
    return math.ceil(x)


@register_latency_model("gap8-analytic")
def gap8_cycles(v: LayerValues, target: Target) -> Number:
    # float literals: on a table's columns an int literal would cost a conversion op per use
    t = v.term
    ho, wo = t.out_hw
    cin = v.cin / t.groups
    per_block = 2.0 * t.kernel * cin + ceil_ste(v.cout / 4.0) * (5.0 + 14.0 * ceil_ste(t.kernel * cin / 4.0) + 10.0)
    return by_kind(t, ceil_int(ho / 2.0) * ceil_int(wo / 8.0) * per_block,
                   depthwise=4.0 * ceil_ste(v.cout / 4.0) * ho * wo * t.kernel,
                   linear=ceil_ste(v.cin / 2.0) * ceil_ste(v.cout / 4.0) * ho,
                   fixed=v.macs / 8.0)  # measured work of an opaque op, at the linear kernel's 8 MACs a cycle


@register_latency_model("mac-rate")
def mac_rate_cycles(v: LayerValues, target: Target) -> Number:
    rate = target.latency.macs_per_cycle
    return v.macs / by_kind(v.term, float(rate["conv"]), depthwise=float(rate["depthwise"]),
                            linear=float(rate["linear"]), fixed=float(rate["linear"]))


@register_latency_model("gap8-tiled")
def gap8_tiled_cycles(v: LayerValues, target: Target) -> Number:
    return tiled_cycles(v, target)


def transfer_cycles(v: LayerValues, target: Target) -> Number:
    """Cycles to move a layer through the next memory level when it overflows the last layer-wise one."""
    levels = target.layerwise_levels
    if not target.latency.charge_next_level or not levels:
        return 0
    last = levels[-1]
    slower = target.memory[target.memory.index(last) + 1:]
    if not slower or slower[0].bytes_per_cycle is None:
        return 0
    need = layer_bytes(v, target, last)
    return select(need > float(last.usable), need / float(slower[0].bytes_per_cycle), 0)


def layer_cycles(v: LayerValues, target: Target) -> Number:
    """Compute cycles of the target's latency model plus the transfer charge."""
    return LATENCY_MODELS[target.latency.model](v, target) + transfer_cycles(v, target)
