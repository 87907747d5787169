"""The duccio annotations of IR nodes: one place owns every `node.meta` key and its typed accessor.

Values are frozen dataclasses so passes cannot mutate each other's results by accident, and torch's own
keys (`tensor_meta`, `val`, `nn_module_stack`, `stack_trace`) are never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch.fx import GraphModule, Node

TENSOR_KEY = "duccio_tensor"
LAYOUT_KEY = "duccio_channels"
COST_KEY = "duccio_cost"
ROLE_KEY = "duccio_role"
TERM_KEY = "duccio_layer_term"  # conv/linear nodes: the static facts the cost formulas evaluate
MASK_KEY = "duccio_mask"  # consumers of masked channels, after mask-insertion
GROUPS_KEY = "duccio_channel_groups"  # on GraphModule.meta: tuple[ChannelGroup, ...]
PASSES_KEY = "duccio_passes"  # on GraphModule.meta: names of the passes run on this graph, in order
MODEL_KEY = "duccio_model"  # on GraphModule.meta: the class name of the traced model (copies lose it)
DORY_KEY = "duccio_dory"  # after dory-layers: the DORY layer a node belongs to, and its part in it
QUANT_KEY = "duccio_quant"  # after calibrate: integer type and scale of a DORY layer's output (and the input)
INTNET_KEY = "duccio_intnet"  # on GraphModule.meta after integerize: the integer network (lower.intnet.IntNet)
CHOICE_KEY = "duccio_choice"  # after supernet-insertion: a choice point's alternatives and their layers
WORK_KEY = "duccio_weighted_work"  # after shape-propagation: conv/linear work done inside an opaque op


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor value, recorded by shape propagation (batch dimension included)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{dt}[{','.join(map(str, self.shape))}]"


# A node's value: a tensor, a (nested) tuple of values, or something that is not a tensor (None).
ValueInfo = Union[TensorInfo, tuple["ValueInfo", ...], None]


@dataclass(frozen=True)
class GroupSlice:
    """Entries `[start, stop)` of channel group `group`, each repeated `block` times along the tensor dim.

    `block > 1` appears after a flatten (each channel owns H*W features) or a depthwise conv with a
    channel multiplier.
    """

    group: int
    start: int
    stop: int
    block: int = 1

    @property
    def width(self) -> int:
        return (self.stop - self.start) * self.block

    def __str__(self) -> str:
        full = f"g{self.group}[{self.start}:{self.stop}]"
        return full if self.block == 1 else f"{full}x{self.block}"


@dataclass(frozen=True)
class ChannelLayout:
    """Which channel group every index of tensor dimension `dim` belongs to."""

    dim: int
    slices: tuple[GroupSlice, ...]

    @property
    def groups(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(s.group for s in self.slices))

    def __str__(self) -> str:
        return f"d{self.dim}:" + "+".join(str(s) for s in self.slices)


LayoutInfo = Union[ChannelLayout, tuple["LayoutInfo", ...], None]


@dataclass(frozen=True)
class OpRole:
    """The channel role the registry gave a node (e.g. 'defines', 'follows', 'couples', 'blocks')."""

    role: str
    rule: str

    def __str__(self) -> str:
        return self.role


@dataclass(frozen=True)
class LayerCost:
    """Per-sample cost of one node: weights it owns, multiply-accumulates, activation sizes in bytes."""

    params: int
    macs: int
    input_bytes: int
    output_bytes: int


# A channel layout as plain data: (group id, or -1 for channels no group tracks, start, stop, block) per slice.
ChannelSpec = tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class LayerTerm:
    """Static facts of one conv/linear layer, which the cost formulas (`duccio_fx.costs.terms`) evaluate
    for any set of kept channels: the same term serves `inspect`, the search and the exported model."""

    name: str
    kind: str  # "conv" | "depthwise" | "grouped" (frozen) | "linear" | "fixed" (measured opaque op, frozen)
    in_spec: ChannelSpec
    out_spec: ChannelSpec
    kernel: int  # kernel elements (1 for linear)
    out_hw: tuple[int, int]  # output rows, columns (conv1d: 1, L; linear: positions, 1)
    positions: int  # positions per sample the MACs scale with (the input's, for a transposed conv)
    in_positions: int  # input positions per sample
    bias: bool
    groups: int
    fixed_weights: int  # weights of a frozen (grouped) layer
    requant: bool  # followed by requantization (False for a head whose output is a model output)
    out_positions: int = 0  # output positions per sample (activations); 0: same as `positions`
    shares_weights_of: str = ""  # a module's second and later calls (named `<module>#k`) store no weights
    fixed_macs: int = 0  # "fixed" layers: MACs per sample as measured
    fixed_biases: int = 0  # "fixed" layers: bias entries
    # geometry a tiling latency model needs (DORY tiles output rows and channels): input rows, columns as
    # `out_hw` folds them; kernel rows, columns; stride along rows, columns. (0, 0) input: same as the output
    in_hw: tuple[int, int] = (0, 0)
    kernel_hw: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    weight_bits: int = 0  # the module's weight precision (`duccio_fx.ir.precision`); 0: the target's
    act_bits: int = 0  # its requantized output's precision; 0: the target's
    in_act_bits: int = 0  # its input's precision (the producing layer's output); 0: the target's

    @property
    def output_positions(self) -> int:
        return self.out_positions or self.positions

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.in_hw if self.in_hw[0] else self.out_hw


@dataclass(frozen=True)
class WeightedWork:
    """The conv and linear work an opaque op (a wrapped function, a leaf module, a matmul with a parameter)
    did on the example input, measured by shape propagation: weights and biases of the parameters it
    multiplied by, named once each, and MACs per sample."""

    weights: int
    biases: int
    macs: int
    tensors: tuple[str, ...]  # qualified names of the parameters counted (a second call shares them)


@dataclass(frozen=True)
class MaskUse:
    """A conv/linear whose input channels are multiplied by the masks of these channel groups."""

    groups: tuple[int, ...]

    def __str__(self) -> str:
        return "mask(" + ",".join(f"g{g}" for g in self.groups) + ")"


@dataclass(frozen=True)
class ChoiceOption:
    """One alternative of a choice point: its name and its conv/linear layers, named as the exported model
    names them when this alternative is chosen (`<point>.<alternative>.<layer>`)."""

    name: str
    terms: tuple[LayerTerm, ...]


@dataclass(frozen=True)
class ChoiceInfo:
    """A choice point of the path method: the node runs one of `options` (the first is the seed's)."""

    point: str
    options: tuple[ChoiceOption, ...]
    declared: bool = False  # a duccio_fx.Choice written in the model file

    def __str__(self) -> str:
        return "choice(" + "|".join(o.name for o in self.options) + ")"


@dataclass(frozen=True)
class DoryPart:
    """A node's part in a DORY layer: `layer` is the layer's index (its golden file's number), or -1 for
    nodes that vanish in the integer network (flatten, dropout, identity, size queries). The layer's main
    node carries the fused activation range `clamp` and the name of the node that ends the layer."""

    layer: int
    kind: str  # "conv" | "linear" | "add" | "maxpool" | "avgpool" (main nodes), "act", "flatten", "none"
    clamp: tuple[float, float] | None = None
    output: str = ""

    def __str__(self) -> str:
        if self.layer < 0:
            return self.kind
        act = "" if self.clamp is None else f"+clip({self.clamp[0]:g},{self.clamp[1]:g})"
        return f"L{self.layer}:{self.kind}{act}"


@dataclass(frozen=True)
class QuantSpec:
    """An 8-bit (or `bits`) integer activation: real value = `scale` * integer, signed or not."""

    scale: float
    bits: int
    signed: bool

    def __str__(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}*{self.scale:.4g}"


def dory_part(node: Node) -> DoryPart | None:
    return node.meta.get(DORY_KEY)


def set_dory_part(node: Node, part: DoryPart) -> None:
    node.meta[DORY_KEY] = part


def quant_spec(node: Node) -> QuantSpec | None:
    return node.meta.get(QUANT_KEY)


def set_quant_spec(node: Node, spec: QuantSpec) -> None:
    node.meta[QUANT_KEY] = spec


def tensor_info(node: Node) -> ValueInfo:
    """The value recorded by shape propagation (None if the pass has not run or the value is no tensor)."""
    return node.meta.get(TENSOR_KEY)


def set_tensor_info(node: Node, info: ValueInfo) -> None:
    node.meta[TENSOR_KEY] = info


def channel_layout(node: Node) -> LayoutInfo:
    """The resolved channel layout of the node's output (None for values without channels)."""
    return node.meta.get(LAYOUT_KEY)


def set_channel_layout(node: Node, layout: LayoutInfo) -> None:
    node.meta[LAYOUT_KEY] = layout


def op_role(node: Node) -> OpRole | None:
    return node.meta.get(ROLE_KEY)


def set_op_role(node: Node, role: OpRole) -> None:
    node.meta[ROLE_KEY] = role


def layer_cost(node: Node) -> LayerCost | None:
    return node.meta.get(COST_KEY)


def set_layer_cost(node: Node, cost: LayerCost) -> None:
    node.meta[COST_KEY] = cost


def layer_term(node: Node) -> LayerTerm | None:
    return node.meta.get(TERM_KEY)


def set_layer_term(node: Node, term: LayerTerm) -> None:
    node.meta[TERM_KEY] = term


def layer_terms(gm: GraphModule) -> list[LayerTerm]:
    """The cost terms of every conv/linear layer of an analysed graph, in graph order."""
    return [t for n in gm.graph.nodes if (t := layer_term(n)) is not None]


def weighted_work(node: Node) -> WeightedWork | None:
    return node.meta.get(WORK_KEY)


def set_weighted_work(node: Node, work: WeightedWork) -> None:
    node.meta[WORK_KEY] = work


def choice_info(node: Node) -> ChoiceInfo | None:
    return node.meta.get(CHOICE_KEY)


def set_choice_info(node: Node, info: ChoiceInfo) -> None:
    node.meta[CHOICE_KEY] = info


def mask_use(node: Node) -> MaskUse | None:
    return node.meta.get(MASK_KEY)


def set_mask_use(node: Node, use: MaskUse) -> None:
    node.meta[MASK_KEY] = use


def spec_of(layout: LayoutInfo, width: int) -> ChannelSpec:
    """The plain-data spec of a tensor layout; an untracked tensor of `width` channels is one -1 slice."""
    if isinstance(layout, ChannelLayout):
        return tuple((s.group, s.start, s.stop, s.block) for s in layout.slices)
    return ((-1, 0, width, 1),)


def model_name(gm: GraphModule) -> str:
    """The class name of the model the graph was traced from."""
    name = type(gm).__name__
    return gm.meta.get(MODEL_KEY) or (name if name != "GraphModule" else gm._get_name())


def passes_run(gm: GraphModule) -> tuple[str, ...]:
    """Names of the passes the pass manager has run on this graph, in order."""
    return gm.meta.get(PASSES_KEY, ())


def record_pass(gm: GraphModule, name: str) -> None:
    gm.meta[PASSES_KEY] = passes_run(gm) + (name,)


def duccio_meta(gm: GraphModule) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every duccio annotation of a graph (graph-level, per node name): pickling a GraphModule drops
    `meta`, so a module that must survive `torch.save` keeps this and gives it back with `restore_meta`."""
    graph = {k: v for k, v in gm.meta.items() if k.startswith("duccio_")}
    nodes = {n.name: {k: v for k, v in n.meta.items() if k.startswith("duccio_")} for n in gm.graph.nodes}
    return graph, nodes


def restore_meta(gm: GraphModule, saved: tuple[dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    graph, nodes = saved
    gm.meta.update(graph)
    for n in gm.graph.nodes:
        n.meta.update(nodes.get(n.name, {}))


def channel_group_of(node: Node) -> tuple[int, ...]:
    """Ids of the channel groups the node's output channels belong to (empty when it has none)."""
    layout = channel_layout(node)
    return layout.groups if isinstance(layout, ChannelLayout) else ()


def source_line(node: Node) -> str:
    """`file.py:12: x = self.conv(x)` for the user code that created the node, or '' if unknown.

    Needs a trace with stack traces recorded; frames inside torch and duccio-fx are skipped.
    """
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines() if ln.strip()]
    found = ""
    for i, line in enumerate(lines):
        if not line.startswith("File "):
            continue
        parts = line.split(",")
        file = parts[0].removeprefix("File ").strip().strip('"')
        if os.path.abspath(file).startswith(skip):
            continue
        lineno = parts[1].strip().removeprefix("line ").strip() if len(parts) > 1 else "?"
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
        found = f"{file}:{lineno}: {code}"
    return found
