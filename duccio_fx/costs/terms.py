"""Layer cost terms: params, MACs and memory elements of a conv/linear layer as functions of its kept channels.

One formula per quantity serves every side. It evaluates one layer (a `LayerTerm`, with Python ints or
tensors as kept-channel counts: per-layer reports) or every layer at once (a `TermTable`: the same fields as
float64 columns, kinds and flags as 0/1 columns, so a formula is a few vector ops whatever the depth: the
costs of a training step, see `duccio_fx.costs.program`). Kind-dependent parts go through `by_kind` and
`select`, which pick for one layer and multiply by 0/1 columns for a table (exact, and gradients reach only
the branch taken). The static facts of a layer are written on the IR by the layer-costs pass; `evaluate`
turns terms and kept channels into `LayerValues` layer by layer, `values_of` does it for a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import (ChannelSpec, LayerTerm, TensorInfo, channel_layout, op_role, spec_of, tensor_info,
                               weighted_work)
from duccio_fx.ir.precision import act_bits_of, weight_bits_of

Number = Union[torch.Tensor, int, float]
KeptChannels = Mapping[int, torch.Tensor]  # group id -> 0/1 vector of its kept channels (absent: all kept)

# ops a head's output may pass through and still be "the model output" (no requantization after it)
_TRANSPARENT = {"flatten", "view", "reshape", "squeeze", "getitem", "dropout", "identity", "contiguous"}


def count(spec: ChannelSpec, kept: KeptChannels) -> Number:
    """Kept entries of a channel layout: a tensor when it touches a kept-channel vector, else an int."""
    total: Number = 0
    for group, start, stop, block in spec:
        vector = kept.get(group)
        total = total + ((stop - start) * block if vector is None else vector[start:stop].sum() * block)
    return total


def width(spec: ChannelSpec) -> int:
    """Entries of a channel layout with every channel kept."""
    return sum((stop - start) * block for _, start, stop, block in spec)


def is_head(node: Node) -> bool:
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


def term_of(gm: GraphModule, node: Node) -> LayerTerm | None:
    """The cost term of a conv/linear module call of an analysed graph (shapes and channels), of an opaque
    op that did conv/linear work on the model's weights (measured by shape propagation), else None."""
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return _fixed_term(gm, node)
    src = node.args[0]
    in_info, out_info = tensor_info(src), tensor_info(node)
    if not isinstance(in_info, TensorInfo) or not isinstance(out_info, TensorInfo):
        return None
    channel_dim = -1 if isinstance(module, nn.Linear) else 1
    in_spec = _features(src, in_info, channel_dim)
    out_spec = _features(node, out_info, channel_dim)
    role = op_role(node).role if op_role(node) else "defines"
    batch = _batch(gm)
    in_fold, out_fold = _fold(in_info, batch), _fold(out_info, batch)
    if isinstance(module, nn.Linear):
        kind, kernel, groups = "linear", 1, 1
        positions = out_fold * math.prod(out_info.shape[1:-1])
        in_positions = in_fold * math.prod(in_info.shape[1:-1])
        out_hw = (positions, 1)
        out_positions = positions
        in_hw, kernel_hw, stride = (in_positions, 1), (1, 1), (1, 1)
    else:
        kernel, groups = math.prod(module.kernel_size), module.groups
        spatial = out_info.shape[2:]
        positions, in_positions = out_fold * math.prod(spatial), in_fold * math.prod(in_info.shape[2:])
        out_positions = positions
        out_hw = _rows_cols(out_fold, spatial)
        kind = {"defines": "conv", "depthwise": "depthwise"}.get(role, "grouped")
        in_spatial = in_info.shape[2:]
        in_hw = _rows_cols(in_fold, in_spatial)
        kernel_hw = _rows_cols(1, module.kernel_size)
        stride = _rows_cols(1, module.stride)
        if module.transposed:
            positions = in_positions  # MACs of a transposed conv scale with its input
    return LayerTerm(str(node.target), kind, in_spec, out_spec, kernel, out_hw, positions, in_positions,
                     module.bias is not None, groups, module.weight.numel(), not is_head(node), out_positions,
                     in_hw=in_hw, kernel_hw=kernel_hw, stride=stride, weight_bits=weight_bits_of(module) or 0,
                     act_bits=act_bits_of(module) or 0, in_act_bits=_input_bits(gm, src))


# ops an activation passes through keeping its integer width (DORY fuses them, or a max pool keeps its input's)
_KEEPS_WIDTH = ("batchnorm", "relu", "hardtanh", "clamp", "dropout", "identity", "flatten", "view", "reshape",
                "maxpool", "max_pool", "contiguous", "squeeze")


def _input_bits(gm: GraphModule, src: Any) -> int:
    """The width a layer's input arrives at: the output width set on the conv/linear that produced it; 0 (the
    target's) otherwise."""
    producer = input_producer(gm, src)
    return (act_bits_of(gm.get_submodule(producer)) or 0) if producer is not None else 0


def input_producer(gm: GraphModule, src: Any) -> str | None:
    """The conv/linear module whose requantized output `src` is, looking through fused activations, batch
    norms, max pools and reshapes (which keep the integer width); None for anything else (an add, a pool
    that requantizes, the model's input)."""
    while isinstance(src, Node) and src.op in ("call_module", "call_function", "call_method"):
        if src.op == "call_module":
            module = gm.get_submodule(str(src.target))
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                return str(src.target)
            name = type(module).__name__.lower()
        else:
            name = getattr(src.target, "__name__", str(src.target)).lower()
        if not any(k in name for k in _KEEPS_WIDTH) or not src.args:
            return None
        src = src.args[0]
    return None


def _rows_cols(fold: int, dims: Sequence[int]) -> tuple[int, int]:
    """Rows and columns of an N-d extent as a 2-d one: the last dim is the columns, the others (times `fold`,
    samples folded into the batch) the rows; a 1-d extent is one row."""
    dims = tuple(int(d) for d in dims) or (1,)
    return (fold * math.prod(dims[:-1]), dims[-1]) if len(dims) > 1 else (fold, dims[0])


def _batch(gm: GraphModule) -> int:
    """The batch size of the analysed example: dim 0 of the first input."""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            break
        info = tensor_info(node)
        if isinstance(info, TensorInfo) and info.shape:
            return info.shape[0]
    return 1


def _fold(info: TensorInfo, batch: int) -> int:
    """How many of a sample's rows dim 0 holds: 1 for [N, ...], k when k rows per sample are folded into it
    (timm's Swin attends over [N x windows, tokens, C]); a tensor not batched (a table computed from
    parameters) counts whole, as it does at batch 1."""
    rows = info.shape[0] if info.shape else 1
    return rows // batch if batch and rows % batch == 0 and rows >= batch else rows


def _fixed_term(gm: GraphModule, node: Node) -> LayerTerm | None:
    """A "fixed" layer: conv/linear work hidden in an op the search does not resize (a wrapped function, a
    leaf module with weights, a functional layer on computed weights), costed as measured. Its activations
    are the tensors it reads and writes, one channel per element."""
    work = weighted_work(node)
    if work is None:
        return None
    batch = _batch(gm)
    per_sample = lambda info: sum(i.numel // max(i.shape[0], 1) * _fold(i, batch) for i in _tensors(info))  # noqa: E731
    elements = [per_sample(tensor_info(a)) for a in dict.fromkeys(node.all_input_nodes) if a.op != "get_attr"]
    out = per_sample(tensor_info(node))
    name = str(node.target) if node.op == "call_module" else node.name
    return LayerTerm(name, "fixed", ((-1, 0, sum(elements), 1),), ((-1, 0, out, 1),), 1, (1, 1), 1, 1,
                     work.biases > 0, 1, work.weights, not is_head(node), fixed_macs=work.macs,
                     fixed_biases=work.biases)


def _tensors(info: object) -> list[TensorInfo]:
    if isinstance(info, TensorInfo):
        return [info] if info.shape else []
    if isinstance(info, tuple):
        return [t for i in info for t in _tensors(i)]
    return []


def _features(node: Node, info: TensorInfo, dim: int) -> ChannelSpec:
    """The spec of the dim a layer multiplies: its channel layout when the channels lie there, else a fixed
    width (a Linear over time or tokens while the channels sit on another dim)."""
    layout = channel_layout(node)
    dim = dim % len(info.shape)
    return spec_of(layout if getattr(layout, "dim", None) == dim else None, info.shape[dim])


class Flag:
    """A yes/no fact of every layer of a `TermTable` as 0/1 float64 columns (`on`, `off`). Formulas choose
    with products by these columns rather than `torch.where`: exact (x·1 + y·0 = x), no gradient where 0,
    and no scalar-to-tensor conversions; a flag true (or false) for every layer costs no op at all."""

    def __init__(self, values: Sequence[bool], device: torch.device) -> None:
        self.on = torch.tensor([float(x) for x in values], dtype=torch.float64, device=device)
        self.off = torch.tensor([float(not x) for x in values], dtype=torch.float64, device=device)
        self.every, self.none = all(values), not any(values)


class TermTable:
    """Many `LayerTerm`s as columns of float64 tensors, with the same field names, so the cost formulas
    evaluate every layer at once (a few vector ops per quantity, whatever the depth): what a training step
    evaluates. The flags `bias`, `requant` and `stores` are `Flag`s; `flag(kinds)` tells the layers' kinds."""

    _NUMBERS = ("kernel", "positions", "in_positions", "output_positions", "groups", "fixed_weights",
                "fixed_macs", "fixed_biases", "weight_bits", "act_bits", "in_act_bits")

    def __init__(self, terms: Sequence[LayerTerm], device: torch.device | str | None = None) -> None:
        self.names: tuple[str, ...] = tuple(t.name for t in terms)
        self.device = torch.device(device or "cpu")
        column = lambda xs: torch.tensor([float(x) for x in xs], dtype=torch.float64, device=self.device)  # noqa: E731
        for name in self._NUMBERS:
            setattr(self, name, column(getattr(t, name) for t in terms))
        pair = lambda xs: (column(x[0] for x in xs), column(x[1] for x in xs))  # noqa: E731
        self.out_hw = pair([t.out_hw for t in terms])
        self.input_hw = pair([t.input_hw for t in terms])
        self.kernel_hw = pair([t.kernel_hw for t in terms])
        self.stride = pair([t.stride for t in terms])
        self.bias = Flag([t.bias for t in terms], self.device)
        self.requant = Flag([t.requant for t in terms], self.device)
        self.stores = Flag([not t.shares_weights_of for t in terms], self.device)
        self.kind_names = tuple(t.kind for t in terms)
        self.zeros = torch.zeros(len(terms), dtype=torch.float64, device=self.device)
        self._flags: dict[frozenset[str], Flag] = {}
        self._bits: dict[tuple[str, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def flag(self, kinds: Iterable[str]) -> Flag:
        """Which layers are of one of `kinds` (made once per set of kinds)."""
        key = frozenset(kinds)
        if key not in self._flags:
            self._flags[key] = Flag([k in key for k in self.kind_names], self.device)
        return self._flags[key]

    def resolved_bits(self, column: str, default: int) -> torch.Tensor:
        """A bits column (`weight_bits`, `act_bits`, `in_act_bits`) with the layers that set none at
        `default` (made once per column and default)."""
        key = (column, default)
        if key not in self._bits:
            values = getattr(self, column)
            self._bits[key] = torch.where(values > 0, values, float(default))
        return self._bits[key]

    @property
    def kinds(self) -> list[str]:
        """The kinds present, sorted (a stable order of ops from run to run)."""
        return sorted(set(self.kind_names))

    @property
    def index(self) -> dict[str, int]:
        """Row of each layer by name (a later row of the same name wins)."""
        return {name: i for i, name in enumerate(self.names)}


Terms = Union[LayerTerm, TermTable]
Condition = Union[bool, Flag, torch.Tensor]


def _times(x: Number, column: torch.Tensor) -> Number:
    """x · a 0/1 column (a plain 0 stays 0; a plain number becomes a float, so no conversion op runs)."""
    if isinstance(x, torch.Tensor):
        return x * column
    return 0 if x == 0 else column * float(x)


def _plus(a: Number, b: Number) -> Number:
    """a + b, skipping a plain 0 (no op)."""
    if not isinstance(a, torch.Tensor) and a == 0:
        return b
    if not isinstance(b, torch.Tensor) and b == 0:
        return a
    return a + b


def by_kind(t: Terms, default: Number, **per_kind: Number) -> Number:
    """The expression of the layer's kind (`default` for kinds not named): one value for a `LayerTerm`, a
    column for a `TermTable` (each layer its kind's value; gradients reach only the expression chosen)."""
    if isinstance(t, LayerTerm):
        return per_kind.get(t.kind, default)
    choices: dict[int, tuple[Number, list[str]]] = {}  # kinds sharing one expression share one product
    for kind, expr in per_kind.items():
        choices.setdefault(id(expr), (expr, []))[1].append(kind)
    choices.setdefault(id(default), (default, []))[1].extend(k for k in t.kinds if k not in per_kind)
    out: Number = 0
    for expr, kinds in choices.values():
        out = _plus(out, select(t.flag(kinds), expr, 0))
    return out


def select(cond: Condition, a: Number, b: Number) -> Number:
    """`a if cond else b`: for one layer (a bool), for a table's layers (a `Flag`), or elementwise on a
    boolean tensor computed in the step (`torch.where`). No host sync."""
    if isinstance(cond, Flag):
        if cond.every or cond.none:
            return a if cond.every else b
        return _plus(_times(a, cond.on), _times(b, cond.off))
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


def stores(t: Terms) -> Condition:
    """Whether the layer stores its weights (a module's second and later calls share the first's)."""
    return not t.shares_weights_of if isinstance(t, LayerTerm) else t.stores


@dataclass(frozen=True)
class LayerValues:
    """A layer's kept channels and the counts that follow (tensors on a searchable model). With a
    `TermTable` as `term`, every field is a column: one entry per layer."""

    term: Terms
    cin: Number
    cout: Number
    weights: Number
    macs: Number
    memo: dict[Any, Number] = field(default_factory=dict, compare=False, repr=False)  # shared sub-results
    weight_bits: Number | None = None  # per layer, the precision a search samples (None: the layers' own)
    in_bits: Number | None = None  # per layer, its input's precision as a search samples it
    out_bits: Number | None = None  # per layer, its output's precision as a search samples it

    def remember(self, key: Any, compute: Callable[[], Number]) -> Number:
        """`compute()` once per key (a layer's bytes at a level feed its size, the overflow and the
        transfer cycles: one evaluation, one set of ops)."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]

    @property
    def elements(self) -> Number:
        """Paper eq. 12 in elements: weights + input + output activations."""
        return self.remember("elements", lambda: self.weights + self.cin * self.term.in_positions
                             + self.cout * self.term.output_positions)

    @property
    def params(self) -> Number:
        """Stored parameters (0 for a module's repeated call: its first call holds them)."""
        return self.remember("params", self._params)

    def _params(self) -> Number:
        t = self.term
        own = self.weights + by_kind(t, select(t.bias, self.cout, 0), fixed=t.fixed_biases)
        return select(stores(t), own, 0)


def weight_bits(v: LayerValues, default: int) -> Number:
    """Each layer's weight precision: the one a search samples now, else its module's, else `default` (the
    target's); a column for a table (resolved once per default, no op per step)."""
    return _bits(v, "weight_bits", "weight_bits", default)


def in_bits(v: LayerValues, default: int) -> Number:
    """Each layer's input activation precision (as `weight_bits`)."""
    return _bits(v, "in_bits", "in_act_bits", default)


def out_bits(v: LayerValues, default: int) -> Number:
    """Each layer's requantized output precision (as `weight_bits`)."""
    return _bits(v, "out_bits", "act_bits", default)


def _bits(v: LayerValues, sampled: str, column: str, default: int) -> Number:
    if getattr(v, sampled) is not None:
        return getattr(v, sampled)
    t = v.term
    if isinstance(t, LayerTerm):
        return getattr(t, column) or default
    return t.resolved_bits(column, default)


def values_of(t: Terms, cin: Number, cout: Number) -> LayerValues:
    """Weights and MACs of layers with `cin` input and `cout` output channels kept."""
    dense = cin * cout * t.kernel  # one expression for both kinds: one product on a table
    weights = by_kind(t, t.fixed_weights, conv=dense, linear=dense, depthwise=cout * t.kernel)
    macs = by_kind(t, weights * t.positions, fixed=t.fixed_macs)
    return LayerValues(t, cin, cout, weights, macs)


def evaluate_term(t: LayerTerm, kept: KeptChannels) -> LayerValues:
    return values_of(t, count(t.in_spec, kept), count(t.out_spec, kept))


def evaluate(terms: Sequence[LayerTerm], kept: KeptChannels | None = None) -> list[LayerValues]:
    """Values of every term for the kept channels (None or {}: every channel kept), layer by layer."""
    kept = kept or {}
    return [evaluate_term(t, kept) for t in terms]


def value(x: Number) -> float:
    """A count as a plain float (detached), for decisions that are not differentiated."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def as_float(x: Any) -> Any:
    """Tensors and nested dicts of them as Python floats (for reports)."""
    if isinstance(x, dict):
        return {k: as_float(v) for k, v in x.items()}
    return value(x)
