"""Target-aware bytes of a layer: what it stores, what it needs at once, and where it fits.

Memory per layer follows DORY's accounting (Layer_node / tiler_conv2d of pulp-platform/dory), so that
"fits L2" means the same thing to both tools:
  input activations + output activations (at their widths: the target's, or the layers' own)
  + weights (at the layer's weight bits, packed: pulp-nn-mixed packs 2/4-bit weights 4/2 to a byte;
    grouped/depthwise weights and biases times the target's `grouped_factor`)
  + requantization constants k and l per output channel (`requant` bits each) for layers that requantize
  + bias (bias bits) only for layers that do not requantize (the head; otherwise the bias folds into l).
A head layer (its output is a model output) is not requantized and writes 32-bit accumulators.
"""

from __future__ import annotations

from typing import Sequence

import torch

from duccio_fx.costs.terms import LayerValues, Number, by_kind, in_bits, out_bits, select, stores, value, weight_bits
from duccio_fx.targets import MemoryLevel, Target


def _bytes(elements: Number, bits: float) -> Number:
    return elements * (bits / 8.0)  # a float factor: exact (bits/8 is a binary fraction), one op on a column


def layer_parameter_bytes(v: LayerValues, target: Target, *, accounting: bool = False) -> Number:
    """Weights + bias or requantization constants at the target's bit widths: what the layer stores.

    With `accounting`, grouped/depthwise weights and biases are scaled by the target's
    `accounting.grouped_factor`, as the deployment tool counts them when it places layers.
    Works on one layer or on a `TermTable`'s columns alike.
    """
    return v.remember(parameter_bytes_key(target, accounting), lambda: _parameter_bytes(v, target, accounting))


def parameter_bytes_key(target: Target, accounting: bool) -> tuple[str, str, bool]:
    """Where `LayerValues` remembers a layer's parameter bytes (see `duccio_fx.costs.bilinear`)."""
    return ("parameter_bytes", target.name, accounting)


def bytes_key(target: Target, level: MemoryLevel | None) -> tuple[str, str, tuple[str, ...]]:
    """Where `LayerValues` remembers the bytes a layer needs at `level` (None: everything it touches)."""
    return ("bytes", target.name, tuple(level.holds) if level is not None else ("weights", "activations"))


def _parameter_bytes(v: LayerValues, target: Target, accounting: bool) -> Number:
    t, bits = v.term, target.bits
    factor = float(target.accounting.grouped_factor)
    grouped = by_kind(t, 1.0, depthwise=factor, grouped=factor) if accounting else 1.0
    total = _bytes(v.weights, weight_bits(v, bits.weights) * grouped)
    per_channel = select(t.bias, _bytes(v.cout, bits.bias * grouped), 0)
    if bits.requant > 0:  # layers that requantize store k and l per output channel (the bias folds into l)
        per_channel = select(t.requant, _bytes(v.cout, 2 * bits.requant), per_channel)
    # an opaque ("fixed") op: its biases as they are, no per-channel requantization known
    total = total + by_kind(t, per_channel, fixed=_bytes(t.fixed_biases, bits.bias))
    return total if accounting else select(stores(t), total, 0)  # a shared module is stored with its first call


def layer_activation_bytes(v: LayerValues, target: Target) -> Number:
    """Input + output activations at their widths (packed; a head writes 32-bit accumulators)."""
    bits = target.bits
    written = select(v.term.requant, out_bits(v, bits.activations), bits.bias)
    return (v.cin * v.term.in_positions * (in_bits(v, bits.activations) / 8.0)
            + v.cout * v.term.output_positions * (written / 8.0))


def layer_bytes(v: LayerValues, target: Target, level: MemoryLevel | None = None) -> Number:
    """Bytes a layer needs at once (DORY's accounting), counting only what `level` holds if given."""
    key = bytes_key(target, level)
    return v.remember(key, lambda: _layer_bytes(v, target, key[2]))


def _layer_bytes(v: LayerValues, target: Target, holds: tuple[str, ...]) -> Number:
    total: Number = 0
    if "weights" in holds:
        total = total + layer_parameter_bytes(v, target, accounting=True)
    if "activations" in holds:
        total = total + layer_activation_bytes(v, target)
    return total


def constrained_layer_bytes(v: LayerValues, target: Target) -> Number:
    """The bytes layer-wise constraints bound: as the first layer-wise level counts them (all, if none)."""
    levels = target.layerwise_levels
    return layer_bytes(v, target, levels[0]) if levels else layer_bytes(v, target)


def placement(v: LayerValues, target: Target) -> str:
    """The fastest memory level (among those holding activations) that holds the whole layer."""
    for m in (m for m in target.memory if "activations" in m.holds):
        if value(layer_bytes(v, target, m)) <= m.usable:
            return m.name
    return "none"


def critical_level(v: LayerValues, target: Target, slack: float) -> str | None:
    """The layer-wise level this layer *almost* fits: usable < bytes <= (1 + slack) * usable."""
    for m in target.layerwise_levels:
        need = value(layer_bytes(v, target, m))
        if m.usable < need <= (1 + slack) * m.usable:
            return m.name
    return None


def critical_slack(v: LayerValues, target: Target) -> tuple[str, float] | None:
    """The first layer-wise level this layer overflows, and the smallest slack C that makes it critical
    there (bytes / usable − 1); None when it fits every layer-wise level."""
    for m in target.layerwise_levels:
        need = value(layer_bytes(v, target, m))
        if need > m.usable:
            return m.name, need / m.usable - 1
    return None


def critical_layers(values: Sequence[LayerValues], target: Target, slack: float) -> dict[str, str]:
    """Layers that overflow a layer-wise level by at most a factor `1 + slack`: {layer: level}."""
    out = {}
    for v in values:
        level = critical_level(v, target, slack)
        if level is not None:
            out[v.term.name] = level
    return out


def overflow_bytes(values: LayerValues, target: Target, layer_weights: torch.Tensor | None = None
                   ) -> dict[str, Number]:
    """Per layer-wise level, the bytes by which layers exceed it, summed (L2V for GAP8's L2), over the
    columns of a `TermTable`'s values: one relu over all layers (each scaled by `layer_weights`, if given)."""
    out = {}
    for m in target.layerwise_levels:
        over = torch.relu(layer_bytes(values, target, m) - float(m.usable))
        out[m.name] = (over if layer_weights is None else over * layer_weights).sum()
    return out
