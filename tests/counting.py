"""An independent count of a model's conv / linear costs, from the ops it really runs.

It uses neither torch.fx nor duccio-fx: the model runs once on a batch-1 input under a
`TorchDispatchMode`, which sees every aten op, whether a module, `F.linear`, `F.conv2d`, `torch.matmul` or
`x @ w` asked for it, inside any module or function. It counts

* every convolution (`aten.convolution`) whose weight derives from model parameters: weights = the numel of
  the parameter (when the weight is a parameter or a view of one) or of the weight computed from parameters
  (a standardised weight, a weight times a gain: the weight deployed); MACs = weight elements × output
  positions (input positions for a transposed conv);
* every matrix product (`mm`, `addmm`, `bmm`, `baddbmm`, `mv`, ...) with an operand that derives from model
  parameters and not from the model's input: weights as for convolutions, MACs = output elements × the
  reduced dim (per sample: the count runs at batch 1);
* the biases that are parameters: the `bias` of a convolution, the added term of `addmm` / `baddbmm`, and
  the `bias` argument of `F.linear` (seen by a `TorchFunctionMode`, since aten adds it with `add_` when the
  input is not contiguous).

"Derives from parameters and not from the input" is followed op by op, per storage: the parameters' storages
start as their own, the inputs' storages as activations; every op's outputs (and the arguments it writes
into) are activations when any tensor argument is one, else they derive from the union of the parameters of
their arguments. So a view, a transpose, a copy, a `.contiguous()` or a standardisation of a weight (timm's
StdConv) stays that weight, while everything computed from the input is an activation. Matmuls of two
activations (attention scores) are not counted; a convolution or matmul whose weight is an activation (a
dynamic weight) or a buffer only (a fixed filter) is recorded in `other`, not in the totals.

Each parameter (and each computed weight, by the parameters it is computed from) counts once in `params`,
however many layers use it; MACs count per call (a module called
twice counts twice). BatchNorm, LayerNorm and every other op are not counted. The inference fast paths of
`nn.MultiheadAttention` / `nn.TransformerEncoderLayer` (fused ops hiding their projections) are switched off
during the count, and ops that mix an activation with parameters under a conv/matmul-like name the counter does
not know are listed in `unhandled`, so a gap shows instead of being missed.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

ACT = "activation"  # the status of a storage computed from the model's input

_CONVS = {aten.convolution.default, aten._convolution.default, aten.convolution_overrideable.default}
# op -> (index of the added term or None, index of operand A, index of operand B)
_MATMULS = {
    aten.mm.default: (None, 0, 1),
    aten.addmm.default: (0, 1, 2),
    aten._addmm_activation.default: (0, 1, 2),
    aten.bmm.default: (None, 0, 1),
    aten.baddbmm.default: (0, 1, 2),
    aten.mv.default: (None, 0, 1),
    aten.addmv.default: (0, 1, 2),
    aten.dot.default: (None, 0, 1),
    aten.vdot.default: (None, 0, 1),
    aten.matmul.default: (None, 0, 1),
}
_SUSPICIOUS = re.compile(r"conv|mm|matmul|linear|attention|lstm|gru|rnn|einsum|dot|mv|bilinear|transformer")


@dataclass(frozen=True)
class Layer:
    """One counted call: a convolution or a matrix product with a parameter operand."""

    name: str               # the weight parameter's name without `.weight` (e.g. "features.0.0")
    op: str                 # the aten op
    weight: tuple[str, ...]  # the parameters its weight operand derives from
    bias: tuple[str, ...]    # the parameters of its bias
    weights: int            # elements of `weight`
    biases: int             # elements of `bias`
    macs: int               # per sample, this call
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass
class Count:
    layers: list[Layer] = field(default_factory=list)
    params: int = 0          # distinct weight and bias parameters' elements, each counted once
    macs: int = 0            # per sample, every call
    other: list[str] = field(default_factory=list)      # convs / matmuls with a dynamic or buffer-only weight
    unhandled: list[str] = field(default_factory=list)  # conv/matmul-like ops with a parameter the counter skips

    @property
    def per_layer(self) -> dict[str, tuple[int, int]]:
        """{name: (params, MACs)}, calls of one weight summed (MACs) and its parameters once."""
        out: dict[str, tuple[int, int]] = {}
        for layer in self.layers:
            p, m = out.get(layer.name, (layer.weights + layer.biases, 0))
            out[layer.name] = (p, m + layer.macs)
        return out


class _Params:
    """Model parameters by storage (a view of a parameter is found through its storage and offset)."""

    def __init__(self, model: nn.Module) -> None:
        self.numel: dict[str, int] = {}
        self.by_storage: dict[int, list[tuple[int, int, str]]] = {}
        for name, p in model.named_parameters():  # shared parameters are listed once
            if p.numel() == 0:
                continue
            self.numel[name] = p.numel()
            ptr = p.untyped_storage().data_ptr()
            self.by_storage.setdefault(ptr, []).append((p.storage_offset(), p.storage_offset() + p.numel(), name))

    def of(self, t: torch.Tensor) -> frozenset[str]:
        entries = self.by_storage.get(_storage(t))
        if not entries:
            return frozenset()
        if len(entries) == 1:
            return frozenset({entries[0][2]})
        lo = t.storage_offset()
        hi = lo + 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        return frozenset(name for a, b, name in entries if a < hi and lo < b)


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


class _Tracker(TorchDispatchMode):
    def __init__(self, params: _Params, inputs: Sequence[torch.Tensor], count: Count) -> None:
        super().__init__()
        self.params = params
        self.count = count
        self.status: dict[int, Any] = {}  # storage -> ACT or frozenset of parameter names
        for ptr, entries in params.by_storage.items():
            self.status[ptr] = frozenset(name for _, _, name in entries)
        for x in inputs:
            self.status[_storage(x)] = ACT

    # -- status of tensors ---------------------------------------------------------------------------
    def of(self, t: Any) -> Any:
        """ACT, or the parameters `t` derives from (empty: a constant or buffer)."""
        if not isinstance(t, torch.Tensor):
            return frozenset()
        ptr = _storage(t)
        if ptr in self.params.by_storage:
            return self.params.of(t)
        return self.status.get(ptr, frozenset())

    def _merge(self, values: list[torch.Tensor]) -> Any:
        merged: frozenset[str] = frozenset()
        for v in values:
            s = self.of(v)
            if s == ACT:
                return ACT
            merged |= s
        return merged

    # -- counting ------------------------------------------------------------------------------------
    def _operand(self, t: Any) -> frozenset[str]:
        """The parameters a weight or bias stands for: a parameter or a view of one counts that parameter; a
        tensor computed from parameters (a standardised weight, a weight times a gain) counts as one derived
        parameter of its own elements, `derived(a,b)`, since that is the weight deployed."""
        s = self.of(t) if isinstance(t, torch.Tensor) else frozenset()
        if not s or s == ACT or _storage(t) in self.params.by_storage:
            return frozenset() if s == ACT else s
        key = f"derived({','.join(sorted(s))})"
        self.params.numel.setdefault(key, t.untyped_storage().nbytes() // max(t.element_size(), 1))
        return frozenset({key})

    @staticmethod
    def _layer_name(names: tuple[str, ...]) -> str:
        flat = [n for key in names for n in (key[8:-1].split(",") if key.startswith("derived(") else [key])]
        main = next((n for n in flat if n.endswith("weight")), flat[0] if flat else "?")
        return main.removesuffix(".weight")

    def _add(self, func: Any, weight: torch.Tensor, bias: Any, macs: int, x: torch.Tensor,
             out: torch.Tensor) -> None:
        w, b = self._operand(weight), self._operand(bias)
        wnames, bnames = tuple(sorted(w)), tuple(sorted(b - w))
        name = self._layer_name(wnames)
        self.count.layers.append(Layer(
            name, str(func.overloadpacket.__name__), wnames, bnames, sum(self.params.numel[n] for n in wnames),
            sum(self.params.numel[n] for n in bnames), int(macs), tuple(x.shape), tuple(out.shape)))

    def _other(self, func: Any, why: str, shape: Any) -> None:
        self.count.other.append(f"{func.overloadpacket.__name__} {list(shape)}: {why}")

    def _conv(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        x, weight = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        transposed = bool(args[6]) if len(args) > 6 else bool(kwargs.get("transposed", False))
        w = self.of(weight)
        if w == ACT or not w:
            self._other(func, "weight computed from the input" if w == ACT else "weight is a buffer or constant",
                        weight.shape)
            return
        positions = math.prod(x.shape[2:]) if transposed else math.prod(out.shape[2:])
        self._add(func, weight, bias, weight.numel() * positions * out.shape[0], x, out)

    def _matmul(self, func: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
        add_i, a_i, b_i = _MATMULS[func]
        a, b = args[a_i], args[b_i]
        sa, sb = self.of(a), self.of(b)
        weighted = [(t, s) for t, s in ((b, sb), (a, sa)) if s != ACT and s]  # b first: F.linear's weight
        if not weighted:
            if ACT not in (sa, sb) or not (sa or sb):  # two constants, or an activation and a buffer
                if (sa == ACT) != (sb == ACT):
                    self._other(func, "operand is a buffer or constant", (a.shape, b.shape))
            return
        if len(weighted) == 2:  # both derive from parameters only: prefer a parameter itself
            direct = [(t, s) for t, s in weighted if _storage(t) in self.params.by_storage]
            weighted = direct[:1] or weighted[:1]
        weight, _ = weighted[0]
        x = a if weight is b else b
        reduced = a.shape[-1] if a.dim() >= 1 else 1
        macs = out.numel() * reduced if out.dim() else reduced
        bias = args[add_i] if add_i is not None else None
        self._add(func, weight, bias, macs, x, out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        if func in _CONVS:
            self._conv(func, args, kwargs, out)
        elif func in _MATMULS:
            self._matmul(func, args, out)
        else:
            statuses = [self.of(t) for t in inputs]
            if ACT in statuses and any(s != ACT and s for s in statuses) \
                    and _SUSPICIOUS.search(func.overloadpacket.__name__):
                self.count.unhandled.append(f"{func} with parameters "
                                            f"{sorted(set().union(*(s for s in statuses if s != ACT)))}")
        status = self._merge(inputs)
        written = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                   and i < len(func._schema.arguments)
                   and func._schema.arguments[i].alias_info is not None
                   and func._schema.arguments[i].alias_info.is_write]
        for t in _tensors(out) + written:
            ptr = _storage(t)
            if ptr and ptr not in self.params.by_storage:
                self.status[ptr] = status
        return out


class _LinearBiases(TorchFunctionMode):
    """The biases of `F.linear` and of `F.multi_head_attention_forward`'s projections: aten adds a bias with
    `add_` when the input is not contiguous (e.g. channels-last, or the [L, N, E] in-projection of attention),
    where no addmm carries it. This mode sees the outermost torch function only, so attention's inner
    F.linear calls are read from its own arguments."""

    # function -> (bias argument, weight argument) pairs, each as (position, name)
    PAIRS = {F.linear: (((2, "bias"), (1, "weight")),),
             F.multi_head_attention_forward: (((6, "in_proj_bias"), (5, "in_proj_weight")),
                                              ((12, "out_proj_bias"), (11, "out_proj_weight")))}

    def __init__(self, count: Count) -> None:
        super().__init__()
        self.count = count
        self.tracker: _Tracker | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.PAIRS or self.tracker is None:
            return func(*args, **kwargs)
        before = len(self.count.layers)
        out = func(*args, **kwargs)
        arg = lambda i, name: args[i] if len(args) > i else kwargs.get(name)  # noqa: E731
        for bias_at, weight_at in self.PAIRS[func]:
            bias, weight = arg(*bias_at), arg(*weight_at)
            b, w = self.tracker._operand(bias), self.tracker._operand(weight)  # as the layers name them
            new = range(before, len(self.count.layers))
            if not b or b == ACT or any(set(self.count.layers[i].bias) | set(self.count.layers[i].weight) >= b
                                        for i in new):
                continue
            users = [i for i in new if w and set(self.count.layers[i].weight) & w] or list(new)[-1:]
            if not users:
                continue
            layer = self.count.layers[users[0]]
            extra = tuple(sorted(b - set(layer.bias) - set(layer.weight)))
            self.count.layers[users[0]] = Layer(
                layer.name, layer.op, layer.weight, layer.bias + extra, layer.weights,
                layer.biases + sum(self.tracker.params.numel[n] for n in extra), layer.macs, layer.in_shape,
                layer.out_shape)
        return out


@contextmanager
def _no_fast_paths() -> Iterator[None]:
    """nn.MultiheadAttention and nn.TransformerEncoderLayer run fused inference kernels that hide their
    linear projections; the count wants the plain ops."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def count(model: nn.Module, inputs: Any) -> Count:
    """Run `model` once (eval mode, no grad) on the first sample of `inputs` (a tensor or a tuple of tensors)
    and count its conv / linear layers; see the module docstring."""
    xs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    xs = tuple(x[:1].clone() if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in xs)
    result = Count()
    params = _Params(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    biases = _LinearBiases(result)
    try:
        with torch.no_grad(), _no_fast_paths(), biases, _Tracker(params, _tensors(xs), result) as tracker:
            biases.tracker = tracker
            model(*xs)
    finally:
        for m, training in modes.items():
            m.training = training
    used: set[str] = set()
    for layer in result.layers:
        used.update(layer.weight)
        used.update(layer.bias)
    result.params = sum(params.numel[n] for n in used)
    result.macs = sum(layer.macs for layer in result.layers)
    return result


def counted_costs(model: nn.Module, inputs: Any) -> tuple[int, int]:
    """(params, MACs per sample) of every conv / linear layer `model` runs, however it calls them."""
    c = count(model, inputs)
    assert not c.unhandled, f"ops the counter does not know mix parameters into activations: {c.unhandled}"
    return c.params, c.macs


def costed_per_layer(layer_params: dict[str, Any], layer_macs: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{layer: (params, MACs)} from another tool's per-layer tables, the calls of a layer called more than once
    (`b`, `b#2`) summed, layers without cost left out: comparable with `Count.per_layer`."""
    out: dict[str, tuple[int, int]] = {}
    for layer, params in layer_params.items():
        key = layer.split("#")[0]
        p, m = out.get(key, (0, 0))
        out[key] = (p + int(params), m + int(layer_macs.get(layer, 0)))
    return {k: v for k, v in out.items() if v != (0, 0)}


def differences(costed: dict[str, tuple[int, int]], count: Count, limit: int = 6) -> list[str]:
    """The layers whose (params, MACs) differ between `costed` (see `costed_per_layer`) and `count`, largest
    first. Names are the weight parameters' (a functional layer may carry another name on the other side)."""
    counted = count.per_layer
    out = []
    for name in sorted(set(costed) | set(counted),
                       key=lambda k: (-max(counted.get(k, (0, 0))[1], costed.get(k, (0, 0))[1]), k)):
        a, b = costed.get(name), counted.get(name)
        if a == b:
            continue
        if a is None:
            out.append(f"{name}: not costed (counted {b[0]} params, {b[1]} MACs)")
        elif b is None:
            out.append(f"{name}: costed {a[0]} params, {a[1]} MACs, not counted")
        else:
            out.append(f"{name}: costed {a[0]} params, {a[1]} MACs; counted {b[0]}, {b[1]}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
