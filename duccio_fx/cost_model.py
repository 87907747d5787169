"""Layer costs as functions of the kept channels: params, MACs, memory and target-aware bytes.

One implementation serves both sides of the search. On a searchable model the kept-channel counts are
tensors (sums of binarized masks), so every cost is differentiable with straight-through gradients; on a
plain analysed model they are Python ints, so `inspect` shows the same numbers the search optimises.

Memory per layer follows DORY's accounting (Layer_node / tiler_conv2d of pulp-platform/dory), so that
"fits L2" means the same thing to both tools:
  input activations + output activations (activation bits)
  + weights (weight bits; grouped/depthwise weights and biases times the target's `grouped_factor`)
  + requantization constants k and l per output channel (`requant` bits each) for layers that requantize
  + bias (bias bits) only for layers that do not requantize (the head; otherwise the bias folds into l).
A head layer (its output is a model output) is not requantized and writes 32-bit accumulators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.masks import MaskSpec, mask_spec
from duccio_fx.meta import ChannelLayout, TensorInfo, channel_layout, op_role, tensor_info

if TYPE_CHECKING:
    from duccio_fx.targets import MemoryLevel, Target

Number = Union[torch.Tensor, int, float]

# ops a head's output may pass through and still be "the model output" (no requantization after it)
_TRANSPARENT = {"flatten", "view", "reshape", "squeeze", "getitem", "dropout", "identity", "contiguous"}


@dataclass(frozen=True)
class LayerTerm:
    """One conv/linear layer: static facts, plus which mask entries count its input and output channels."""

    name: str
    kind: str  # "conv" | "depthwise" | "grouped" (frozen) | "linear"
    in_spec: MaskSpec
    out_spec: MaskSpec
    kernel: int  # kernel elements (1 for linear)
    out_hw: tuple[int, int]  # output rows, columns (conv1d: 1, L; linear: positions, 1)
    positions: int  # positions per sample the MACs scale with (the input's, for a transposed conv)
    in_positions: int  # input positions per sample
    bias: bool
    groups: int
    fixed_weights: int  # weights of a frozen layer
    requant: bool  # followed by requantization (False for a head whose output is a model output)
    out_positions: int = 0  # output positions per sample (activations); 0: same as `positions`

    @property
    def output_positions(self) -> int:
        return self.out_positions or self.positions


def count(spec: MaskSpec, masks: Sequence[torch.Tensor]) -> Number:
    """Kept entries of a channel layout: a tensor when it touches a mask, else an int."""
    total: Number = 0
    for index, start, stop, block in spec:
        total = total + ((stop - start) * block if index < 0 else masks[index][start:stop].sum() * block)
    return total


def _is_head(node: Node) -> bool:
    """True when the node's value reaches the graph output only through reshapes (no requantization)."""
    frontier = [node]
    while frontier:
        n = frontier.pop()
        for user in n.users:
            if user.op == "output":
                return True
            name = str(user.target).split(".")[-1].lower() if user.op != "call_module" else \
                type(user.graph.owning_module.get_submodule(str(user.target))).__name__.lower()
            if any(t in name for t in _TRANSPARENT):
                frontier.append(user)
    return False


def layer_terms(gm: GraphModule, bank_index: dict[int, int]) -> list[LayerTerm]:
    """The cost terms of every conv/linear module of an analysed graph (needs shapes and channels)."""
    terms = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        src = node.args[0]
        in_lay, out_lay = channel_layout(src), channel_layout(node)
        in_info, out_info = tensor_info(src), tensor_info(node)
        assert isinstance(in_info, TensorInfo) and isinstance(out_info, TensorInfo)
        in_spec = mask_spec(in_lay, bank_index) if isinstance(in_lay, ChannelLayout) else \
            ((-1, 0, in_info.shape[-1 if isinstance(module, nn.Linear) else 1], 1),)
        out_spec = mask_spec(out_lay, bank_index) if isinstance(out_lay, ChannelLayout) else \
            ((-1, 0, out_info.shape[-1 if isinstance(module, nn.Linear) else 1], 1),)
        role = op_role(node).role if op_role(node) else "defines"
        if isinstance(module, nn.Linear):
            kind, kernel, groups = "linear", 1, 1
            positions = math.prod(out_info.shape[1:-1])
            in_positions = math.prod(in_info.shape[1:-1])
            out_hw = (positions, 1)
            out_positions = positions
        else:
            kernel, groups = math.prod(module.kernel_size), module.groups
            spatial = out_info.shape[2:]
            positions, in_positions = math.prod(spatial), math.prod(in_info.shape[2:])
            out_positions = positions
            out_hw = (1, spatial[0]) if len(spatial) == 1 else (math.prod(spatial[:-1]), spatial[-1])
            kind = {"defines": "conv", "depthwise": "depthwise"}.get(role, "grouped")
            if module.transposed:
                positions = in_positions  # MACs of a transposed conv scale with its input
        terms.append(LayerTerm(str(node.target), kind, in_spec, out_spec, kernel, out_hw, positions, in_positions,
                               module.bias is not None, groups, module.weight.numel(), not _is_head(node),
                               out_positions))
    return terms


@dataclass(frozen=True)
class LayerValues:
    """A layer's kept channels and the counts that follow (tensors on a searchable model)."""

    term: LayerTerm
    cin: Number
    cout: Number
    weights: Number
    macs: Number

    @property
    def elements(self) -> Number:
        """Paper eq. 12 in elements: weights + input + output activations."""
        return self.weights + self.cin * self.term.in_positions + self.cout * self.term.output_positions

    @property
    def params(self) -> Number:
        return self.weights + (self.cout if self.term.bias else 0)


def evaluate(terms: Sequence[LayerTerm], masks: Sequence[torch.Tensor]) -> list[LayerValues]:
    out = []
    for t in terms:
        cin, cout = count(t.in_spec, masks), count(t.out_spec, masks)
        if t.kind in ("conv", "linear"):
            weights = cin * cout * t.kernel
        elif t.kind == "depthwise":
            weights = cout * t.kernel
        else:
            weights = t.fixed_weights
        out.append(LayerValues(t, cin, cout, weights, weights * t.positions))
    return out


# -- target-aware costs -----------------------------------------------------------------------------

def _bytes(elements: Number, bits: int) -> Number:
    return elements * bits / 8


def layer_parameter_bytes(v: LayerValues, target: Target, *, accounting: bool = False) -> Number:
    """Weights + bias or requantization constants at the target's bit widths: what the layer stores.

    With `accounting`, grouped/depthwise weights and biases are scaled by the target's
    `accounting.grouped_factor`, as the deployment tool counts them when it places layers.
    """
    bits = target.bits
    grouped = target.accounting.grouped_factor if accounting and v.term.kind in ("depthwise", "grouped") else 1
    total = _bytes(v.weights, bits.weights) * grouped
    if v.term.requant and bits.requant > 0:
        total = total + _bytes(2 * v.cout, bits.requant)
    elif v.term.bias:
        total = total + _bytes(v.cout, bits.bias) * grouped
    return total


def layer_activation_bytes(v: LayerValues, target: Target) -> Number:
    bits = target.bits
    out_bits = bits.activations if v.term.requant else bits.bias
    return _bytes(v.cin * v.term.in_positions, bits.activations) + _bytes(v.cout * v.term.output_positions, out_bits)


def layer_bytes(v: LayerValues, target: Target, level: MemoryLevel | None = None) -> Number:
    """Bytes a layer needs at once (DORY's accounting), counting only what `level` holds if given."""
    holds = level.holds if level is not None else ("weights", "activations")
    total: Number = 0
    if "weights" in holds:
        total = total + layer_parameter_bytes(v, target, accounting=True)
    if "activations" in holds:
        total = total + layer_activation_bytes(v, target)
    return total


def placement(v: LayerValues, target: Target) -> str:
    """The fastest memory level (among those holding activations) that holds the whole layer."""
    candidates = [m for m in target.memory if "activations" in m.holds]
    for m in candidates:
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


def overflow_bytes(values: Sequence[LayerValues], target: Target) -> dict[str, Number]:
    """Per layer-wise level, the bytes by which layers exceed it, summed (L2V for GAP8's L2)."""
    out: dict[str, Number] = {}
    for m in target.layerwise_levels:
        total: Number = 0
        for v in values:
            need = layer_bytes(v, target, m)
            total = total + (torch.relu(need - m.usable) if isinstance(need, torch.Tensor) else max(0, need - m.usable))
        out[m.name] = total
    return out


def target_costs(values: Sequence[LayerValues], target: Target) -> dict[str, Any]:
    """Size, per-layer bytes and cycles, latency: everything a constraint may bound, for one target."""
    from duccio_fx.latency import layer_cycles

    size: Number = 0
    cycles: Number = 0
    per_layer_bytes: dict[str, Number] = {}
    per_layer_cycles: dict[str, Number] = {}
    for v in values:
        size = size + layer_parameter_bytes(v, target)
        per_layer_bytes[v.term.name] = layer_bytes(v, target, target.layerwise_levels[0]) \
            if target.layerwise_levels else layer_bytes(v, target)
        c = layer_cycles(v, target)
        per_layer_cycles[v.term.name] = c
        cycles = cycles + c
    return {"size_bytes": size, "layer_bytes": per_layer_bytes, "layer_cycles": per_layer_cycles,
            "cycles": cycles, "latency_s": cycles / target.compute.clock,
            "overflow_bytes": overflow_bytes(values, target)}


def value(x: Number) -> float:
    """A count as a plain float (detached), for decisions that are not differentiated."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def as_float(x: Any) -> Any:
    """Tensors and nested dicts of them as Python floats (for reports)."""
    if isinstance(x, dict):
        return {k: as_float(v) for k, v in x.items()}
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)
