"""dory-layers: group the float graph into DORY layers, fuse activations, and refuse what DORY cannot run.

Which part of a DORY layer an op can be comes from the op registry: this module attaches a `"dory"` hook to
each supported op's entry (`register_dory_hooks`), as the export attaches its `"shrink"` hooks; an op without
one is refused. A DORY layer is one generated C function: a conv or linear with its requantization (and the activation
fused into it), a residual add, a max pooling, or an average pooling with its requantization. This pass
annotates every node with its `DoryPart` (which layer, what part) without changing the graph, so the graph
still runs in float and `--dump-ir` shows the grouping. Layers are numbered in graph order, which is the
order DORY numbers its golden files.

Activations: ReLU, ReLU6, hardtanh and clamp with constant bounds fuse into the layer that produces their
input (through a max pooling too, since max commutes with a monotone clamp). The value before the
activation must have no other user, because the integer network never materialises it.

Everything else is refused before anything is written, with the node, the source line and what to change:
ops DORY has no kernel for (sigmoid/hardswish gates, multiplications, concatenation or reshapes in
mid-network), grouped but not depthwise convs, dilation, and convs that the target's L1 cannot tile. Every
such op is reported at once (a `DoryRefusal` listing each with its own fix), so one run shows all the
changes a model needs; what only follows from a refused op (an activation after it) is not reported again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import DoryPart, TensorInfo, dory_part, set_dory_part, source_line, tensor_info
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.registry import REGISTRY, Hook, OpRegistry, add_hook
from duccio_fx.targets import Target

# What to do instead, for ops users often have where DORY has no kernel.
_FIXES: dict[str, str] = {
    "hardswish": "replace hardswish with ReLU6",
    "hardsigmoid": "remove the hard-sigmoid gate (e.g. the squeeze-excitation block); DORY has no gating multiply",
    "sigmoid": "remove the sigmoid gate; DORY runs a sigmoid only after the last layer, as post-processing",
    "silu": "replace SiLU/swish with ReLU or ReLU6",
    "gelu": "replace GELU with ReLU or ReLU6",
    "tanh": "replace tanh with hardtanh or ReLU6",
    "mul": "remove the multiplication: DORY multiplies only inside a layer's requantization",
    "cat": "remove the concatenation: DORY ignores Concat in mid-network (use a residual add instead)",
    "batch_norm": "put the BatchNorm right after a conv or linear layer (it is then folded into it), or remove it",
    "softmax": "drop the softmax from the model: apply it to the int32 outputs on the host",
}


def _err(node: Node, what: str, fix: str) -> DuccioError:
    where = f"node '{node.name}'"
    line = source_line(node)
    if line:
        where += f" at {line}"
    return DuccioError(what, where=where, fix=fix, node=node.name)


class DoryRefusal(DuccioError):
    """Several ops DORY cannot run: `problems` holds one error per op (what, where, how to fix)."""

    def __init__(self, problems: list[DuccioError]) -> None:
        self.problems = list(problems)
        lines = [f"DORY cannot run {len(self.problems)} ops of this model (each listed with its fix):"]
        for i, p in enumerate(self.problems, 1):
            lines.append(f"  {i}. {p.what}")
            if p.where:
                lines.append(f"     where: {p.where}")
            if p.fix:
                lines.append(f"     how to fix: {p.fix}")
        nodes = ", ".join(f"'{p.node}'" for p in self.problems if p.node)
        super().__init__("\n".join(lines), where=f"nodes {nodes}" if nodes else None,
                         fix="change each op as its own 'how to fix' says, then lower again")


def refusal(problems: list[DuccioError]) -> DuccioError:
    """The error for `problems`: the one error itself, or a `DoryRefusal` listing them all."""
    return problems[0] if len(problems) == 1 else DoryRefusal(problems)


def _describe(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return f"module {type(gm.get_submodule(str(node.target))).__name__} ('{node.target}')"
    if node.op == "call_function":
        return f"function {getattr(node.target, '__name__', str(node.target))}"
    return f"{node.op} {node.target}"


def _fix_for(gm: GraphModule, node: Node) -> str:
    text = _describe(gm, node).lower()
    for key, fix in _FIXES.items():
        if key.replace("_", "") in text.replace("_", ""):
            return fix
    return "replace it with conv, linear, ReLU/ReLU6, residual add, max/average pooling, flatten before a linear"


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _shape(node: Any) -> tuple[int, ...] | None:
    info = tensor_info(node) if isinstance(node, Node) else None
    return tuple(info.shape) if isinstance(info, TensorInfo) else None


def producing_layer(value: Any) -> int | None:
    """The DORY layer whose output `value` is, back through flattens and no-ops: its index, -1 for the network
    input, None when no annotated producer is found (dory-layers has not run)."""
    node = value
    while isinstance(node, Node):
        if node.op == "placeholder":
            return -1
        part = dory_part(node)
        if part is not None and part.layer >= 0:
            return part.layer
        node = node.args[0] if node.args else None
    return None


# -- what DORY runs, as "dory" hooks on the op registry's entries: hook(gm, node) -> the node's part ----------

DORY_HOOK = "dory"


def _kind(kind: str) -> Hook:
    return lambda gm, node: kind


def _two_tensors(gm: GraphModule, node: Node) -> str:
    return "add" if sum(isinstance(a, Node) for a in node.args[:2]) == 2 else "unsupported"


def _no_tensor(gm: GraphModule, node: Node) -> str:
    return "none" if _shape(node) is None else "unsupported"


def _activation(gm: GraphModule, node: Node) -> str:
    """ReLU / ReLU6 / hardtanh / clamp fuse as a clip. A (leaf) subclass of one with its own forward may compute
    something else, which a clip would silently replace: it fuses only when it gives its base class's values
    on a probe of the recorded input shape spanning [-8, 8]."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        base = next(c for c in type(module).__mro__ if c in (nn.ReLU, nn.ReLU6, nn.Hardtanh))
        if type(module).forward is not base.forward:
            info = tensor_info(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
            if not isinstance(info, TensorInfo):
                return "unsupported"
            probe = torch.linspace(-8.0, 8.0, info.numel).reshape(info.shape)
            try:
                with torch.no_grad():
                    same = torch.equal(module(probe), base.forward(module, probe))
            except Exception:
                same = False
            if not same:
                return "unsupported"
    return "act"


def _conv2d(gm: GraphModule, node: Node) -> str:
    return "conv" if isinstance(gm.get_submodule(str(node.target)), nn.Conv2d) else "unsupported"


def register_dory_hooks(registry: OpRegistry = REGISTRY) -> None:
    """Attach the DORY part of every op the lowering supports to its registry entry. A user op DORY runs
    as one of these parts (an activation, a no-op, a flatten) gets its hook with `add_hook(op, "dory", fn)`."""
    table: list[tuple[tuple[Any, ...], Hook]] = [
        ((nn.modules.conv._ConvNd,), _conv2d),
        ((nn.Linear,), _kind("linear")),
        ((nn.ReLU, nn.ReLU6, nn.Hardtanh, F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh,
          torch.clamp, torch.clip, "relu", "relu_", "clamp", "clamp_", "clip", "clip_"), _activation),
        ((nn.MaxPool2d, F.max_pool2d), _kind("maxpool")),
        ((nn.AvgPool2d, nn.AdaptiveAvgPool2d, F.avg_pool2d, F.adaptive_avg_pool2d, torch.mean, "mean"),
         _kind("avgpool")),
        ((operator.add, operator.iadd, torch.add, "add", "add_"), _two_tensors),
        ((nn.Flatten, torch.flatten, "flatten", "view", "reshape"), _kind("flatten")),
        ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, F.dropout, F.dropout1d, F.dropout2d, "size", "dim",
          "contiguous"), _kind("none")),
        ((getattr, operator.getitem), _no_tensor),
    ]
    for ops, hook in table:
        for op in ops:
            add_hook(op, DORY_HOOK, hook, registry)


register_dory_hooks()


@dataclass
class DoryLayers(Pass):
    """Annotates `DoryPart` on every node; `target` (optional) adds its tiling limits."""

    target: Target | None = None
    registry: OpRegistry = field(default_factory=lambda: REGISTRY)
    name = "dory-layers"
    requires = ("shape-propagation", "fold-batchnorm")
    kinds: list[str] = field(default_factory=list, init=False)

    def run(self, gm: GraphModule) -> bool:
        self.gm = gm
        self.kinds = []
        self.main: dict[int, Node] = {}
        self.problems: list[DuccioError] = []
        self.refused: set[Node] = set()  # refused nodes, and what only follows from them
        for node in gm.graph.nodes:
            try:
                self._visit(node)
            except DuccioError as err:
                self.problems.append(err)
                self.refused.add(node)
        self._check_flattens(gm)
        if self.problems:
            order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
            self.problems.sort(key=lambda err: order.get(err.node or "", len(order)))
            raise refusal(self.problems)
        return False

    # -- helpers ---------------------------------------------------------------------------------------

    def _new_layer(self, node: Node, kind: str) -> None:
        index = len(self.kinds)
        self.kinds.append(kind)
        self.main[index] = node
        set_dory_part(node, DoryPart(index, kind, None, node.name))

    def _module(self, node: Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def _after_refused(self, value: Any) -> bool:
        """`value` is a refused node's output, or reaches one back through flattens and no-ops (the way
        `producing_layer` looks for its layer)."""
        node = value
        while isinstance(node, Node):
            if node in self.refused:
                return True
            if node.op == "placeholder":
                return False
            part = dory_part(node)
            if part is not None and part.layer >= 0:
                return False
            node = node.args[0] if node.args else None
        return False

    def _layer_of(self, value: Any) -> int:
        """The layer whose output `value` is (through flattens and no-ops); -1 for the network input."""
        layer = producing_layer(value)
        if layer is not None:
            return layer
        raise _err(value if isinstance(value, Node) else next(iter(self.gm.graph.nodes)),
                   "DORY cannot tell which layer produces this value", "report this model")

    # -- the visitor -----------------------------------------------------------------------------------

    def _visit(self, node: Node) -> None:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is None or len(shape) != 4:
                raise _err(node, f"the DORY lowering takes one [N, C, H, W] image input, this one is {shape}",
                           "give the model a 4-D input (a 1-D signal as [N, C, 1, L])")
            if sum(n.op == "placeholder" for n in self.gm.graph.nodes) != 1:
                raise _err(node, "the DORY lowering takes a model with one input", "give forward one tensor input")
            set_dory_part(node, DoryPart(-1, "input"))
            return
        if node.op == "output":
            outs = node.args[0]
            if not isinstance(outs, Node):
                raise _err(node, "DORY networks have one output tensor", "return a single tensor from forward")
            if not self._after_refused(outs):
                self._layer_of(outs)
            return
        if node.op == "get_attr":
            raise _err(node, f"a parameter or buffer ('{node.target}') is used as a value in mid-network",
                       "keep parameters inside conv/linear layers")
        kind = self._classify(node)
        if kind in ("conv", "linear", "maxpool", "avgpool", "add"):
            self._check_layer(node, kind)
            self._new_layer(node, kind)
        elif kind == "act":
            if self._after_refused(node.args[0] if node.args else None):
                self.refused.add(node)  # follows from the refused op: reported there
            else:
                self._fuse(node)
        elif kind in ("flatten", "none"):
            set_dory_part(node, DoryPart(-1, kind))
        else:
            raise _err(node, f"DORY has no kernel for {_describe(self.gm, node)}", _fix_for(self.gm, node))

    def _classify(self, node: Node) -> str:
        hook = self.registry.hook(self.gm, node, DORY_HOOK)
        return str(hook(self.gm, node)) if hook is not None else "unsupported"

    # -- per-kind checks -------------------------------------------------------------------------------

    def _check_layer(self, node: Node, kind: str) -> None:
        if kind == "conv":
            self._check_conv(node)
        elif kind == "linear":
            shape = _shape(node.args[0])
            if shape is None or len(shape) != 2:
                raise _err(node, f"a linear layer on a {shape} tensor: DORY's FC takes a flat [N, C] input",
                           "flatten the input before the linear layer (torch.flatten(x, 1))")
        elif kind == "add":
            a, b = node.args[:2]
            if _shape(a) != _shape(b) or _shape(a) is None or len(_shape(a) or ()) != 4:
                raise _err(node, f"a residual add of {_shape(a)} and {_shape(b)}: DORY adds two equal [N, C, H, W] "
                                 "tensors", "make both branches the same shape (no broadcasting)")
        elif kind in ("maxpool", "avgpool"):
            self._pool_geometry(node, kind)

    def _check_conv(self, node: Node) -> None:
        conv = self._module(node)
        assert isinstance(conv, nn.Conv2d)
        if any(d != 1 for d in conv.dilation):
            raise _err(node, f"a conv with dilation {conv.dilation}: DORY's kernels have no dilation",
                       "use dilation 1 (a larger kernel or an extra strided layer instead)")
        if conv.groups != 1 and not (conv.groups == conv.in_channels == conv.out_channels):
            raise _err(node, f"a grouped conv ({conv.groups} groups, {conv.in_channels} -> {conv.out_channels} "
                             "channels): DORY runs only ungrouped and depthwise convs",
                       "make the conv depthwise or ungrouped (groups = in = out channels, or groups = 1)")
        if conv.padding_mode != "zeros":
            raise _err(node, f"a conv with padding_mode '{conv.padding_mode}'", "use zero padding")
        if self.target is not None and conv.groups == 1:
            need, have = self._min_l1_bytes(conv), self._l1_bytes()
            if have is not None and need > have:
                kh, kw = conv.kernel_size
                raise _err(node, f"a {kh}x{kw} conv with {conv.in_channels} input channels cannot be tiled on "
                                 f"{self.target.name}: its smallest tile needs {need} B of L1, {have} B are usable",
                           "give it fewer input channels (a channel constraint or a smaller seed), or a 1x1 "
                           "conv / depthwise-separable block instead")

    def _l1_bytes(self) -> int | None:
        assert self.target is not None
        levels = [lv for lv in self.target.memory if lv.name.upper() == "L1"]
        return (levels[0].size - levels[0].reserved) if levels else None

    def _min_l1_bytes(self, conv: nn.Conv2d) -> int:
        """The smallest L1 footprint DORY's conv tiler can choose: all input channels (it never splits them
        for an ungrouped conv), one output pixel of one channel, the im2col buffer of every core."""
        assert self.target is not None
        t = self.target
        db = t.deployment.double_buffering
        window = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels
        act, wbits = t.bits.activations, t.bits.weights
        inputs = db * window * act // 8
        weights = db * window * wbits // 8
        outputs = db * act // 8
        constants = db * 2 * t.bits.requant // 8
        im2col = 2 * t.compute.cores * window
        return inputs + weights + outputs + constants + im2col + t.deployment.l1_tile_overhead

    def _pool_geometry(self, node: Node, kind: str) -> None:
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 4:
            raise _err(node, f"pooling over a {shape} tensor", "pool [N, C, H, W] tensors")
        if node.op == "call_module":
            m = self._module(node)
            if isinstance(m, nn.AdaptiveAvgPool2d):
                if _pair(m.output_size if m.output_size is not None else 1) != (1, 1):
                    raise _err(node, f"adaptive average pooling to {m.output_size}", "pool to 1x1 (global pooling)")
                return
            if getattr(m, "ceil_mode", False):
                raise _err(node, "pooling with ceil_mode=True", "use ceil_mode=False")
            if isinstance(m, nn.MaxPool2d) and _pair(m.dilation) != (1, 1):
                raise _err(node, "max pooling with dilation", "use dilation 1")
            if isinstance(m, nn.AvgPool2d) and _pair(m.padding) != (0, 0):
                raise _err(node, "average pooling with padding: DORY's kernel pads asymmetrically wrong",
                           "use padding 0 for average pooling")
        elif kind == "avgpool" and not self._is_global_mean(node):
            if node.target is F.avg_pool2d and _pair(node.kwargs.get("padding", node.args[3] if len(node.args) > 3
                                                                       else 0)) != (0, 0):
                raise _err(node, "average pooling with padding", "use padding 0 for average pooling")
            if node.target is not F.avg_pool2d:
                raise _err(node, "an average over dims other than H and W", "average over (2, 3) only")

    def _is_global_mean(self, node: Node) -> bool:
        if node.target is F.adaptive_avg_pool2d:
            return _pair(node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")) == (1, 1)
        if node.target in (torch.mean, "mean"):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
            return sorted(d % 4 for d in dims if isinstance(d, int)) == [2, 3]
        return False

    # -- activation fusion -----------------------------------------------------------------------------

    def _clamp(self, node: Node) -> tuple[float, float]:
        if node.op == "call_module":
            m = self._module(node)
            if isinstance(m, nn.ReLU6):
                return (0.0, 6.0)
            if isinstance(m, nn.Hardtanh):
                return (float(m.min_val), float(m.max_val))
            return (0.0, math.inf)
        if node.target is F.relu6:
            return (0.0, 6.0)
        if node.target is F.hardtanh:
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return (float(lo), float(hi))
        if node.target in (torch.clamp, torch.clip, "clamp", "clip", "clamp_", "clip_"):
            lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
            hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
            if isinstance(lo, Node) or isinstance(hi, Node):
                raise _err(node, "a clamp with tensor bounds", "clamp with constant bounds")
            return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
        return (0.0, math.inf)

    def _fuse(self, node: Node) -> None:
        source = node.args[0]
        layer = self._layer_of(source)
        if layer < 0 or not isinstance(source, Node) or dory_part(source) is None or dory_part(source).layer != layer:
            raise _err(node, "an activation that follows no conv, linear, add or pooling layer",
                       "put the activation right after a layer (DORY fuses it into that layer's requantization)")
        if len(source.users) != 1:
            raise _err(node, f"the value before this activation ('{source.name}') is also used elsewhere, but "
                             "DORY only keeps the activated value", "use the activated value in both places")
        clamp = self._clamp(node)
        fused_into = layer
        if self.kinds[layer] == "maxpool":  # max commutes with a clamp: fuse into the pool's producer
            pool = self.main[layer]
            inner = pool.args[0]
            producer = self._layer_of(inner)
            if producer < 0 or len(inner.users) != 1 or self.kinds[producer] == "maxpool":
                raise _err(node, "an activation after a max pooling whose input DORY cannot clamp",
                           "apply the activation before the pooling")
            fused_into = producer
        main = self.main[fused_into]
        part = dory_part(main)
        assert part is not None
        old = part.clamp or (-math.inf, math.inf)
        merged = (max(old[0], clamp[0]), min(old[1], clamp[1]))
        output = node.name if fused_into == layer else part.output
        set_dory_part(main, DoryPart(part.layer, part.kind, merged, output))
        if fused_into != layer:  # the pool's output now equals the activation's
            pool_part = dory_part(self.main[layer])
            assert pool_part is not None
            set_dory_part(self.main[layer], DoryPart(layer, pool_part.kind, pool_part.clamp, node.name))
        set_dory_part(node, DoryPart(layer, "act"))

    def _check_flattens(self, gm: GraphModule) -> None:
        """A flatten/view is free only right before a linear layer (DORY ignores reshapes)."""
        for node in gm.graph.nodes:
            part = dory_part(node)
            if part is None or part.kind != "flatten":
                continue
            out_shape = _shape(node)
            if out_shape is None or len(out_shape) != 2:
                self.problems.append(_err(node, f"a reshape to {out_shape} in mid-network: DORY ignores reshapes",
                                          "reshape only to flatten [N, C, H, W] into [N, C*H*W] right before a "
                                          "linear layer"))
                continue
            for user in self._consumers(node):
                if user in self.refused:
                    continue
                if dory_part(user) is None or dory_part(user).kind != "linear":
                    self.problems.append(_err(node, "a flatten whose result does not go straight into a linear "
                                                    "layer", "flatten only right before the linear head"))
                    break

    def _consumers(self, node: Node) -> list[Node]:
        found: list[Node] = []
        for user in node.users:
            part = dory_part(user)
            if part is not None and part.kind in ("flatten", "none") and _shape(user) is not None:
                found += self._consumers(user)
            elif user.op != "output":
                found.append(user)
        return found

