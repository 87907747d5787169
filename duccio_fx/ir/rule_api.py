"""The API a channel rule is written against: `RuleContext` and small helpers.

A rule reads its inputs' layouts through a `RuleContext`, records constraints (couple, consume, freeze)
and returns the layout of the node's output. Users writing a rule for their own op use only this module.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.channels import ChannelSolver, RawLayout
from duccio_fx.ir.meta import TensorInfo, ValueInfo, tensor_info
from duccio_fx.ir.registry import OpRegistry, describe_target

RawValue = Any  # RawLayout | tuple[RawValue, ...] | None


class RuleContext:
    """What a rule may read and record while the channel analysis walks the graph."""

    def __init__(self, gm: GraphModule, solver: ChannelSolver, registry: OpRegistry) -> None:
        self.gm = gm
        self.solver = solver
        self.registry = registry
        self.layouts: dict[Node, RawValue] = {}
        self.roles: dict[Node, str] = {}
        self.first_call: dict[str, Node] = {}  # module name -> its first call (modules called twice share weights)

    # -- reading -----------------------------------------------------------------------------------
    def layout(self, value: Any) -> RawValue:
        return self.layouts.get(value) if isinstance(value, Node) else None

    @staticmethod
    def info(value: Any) -> ValueInfo:
        return tensor_info(value) if isinstance(value, Node) else None

    def module(self, node: Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def owner(self, node: Node) -> str:
        """Qualified module or attribute name for module calls and attributes, the node name otherwise."""
        return str(node.target) if node.op in ("call_module", "get_attr") else node.name

    def where(self, node: Node) -> str:
        return f"{describe_target(self.gm, node)} at node '{node.name}'"

    def setting(self, node: Node, name: str, index: int, default: Any = None) -> Any:
        """An op's setting: the module's attribute `name` for a module call, else argument `index` / `name`
        (`dim` of nn.Softmax vs F.softmax, `normalized_shape` of nn.LayerNorm vs F.layer_norm)."""
        if node.op == "call_module":
            return getattr(self.module(node), name, default)
        return self.arg(node, index, name, default)

    @staticmethod
    def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # -- recording ---------------------------------------------------------------------------------
    def set_role(self, node: Node, role: str) -> None:
        self.roles[node] = role

    def new_space(self, node: Node, size: int, dim: int, kind: str = "producer",
                  frozen: str | None = None) -> RawLayout:
        seg = self.solver.new_space(size, node.name, self.owner(node), kind, frozen)
        return RawLayout(dim, (seg,))

    def couple(self, a: RawLayout, b: RawLayout, node: Node) -> None:
        why = self.solver.couple(a, b)
        if why is not None:
            reason = f"{self.where(node)} combines tensors whose channels cannot be matched: {why}"
            self.solver.freeze(a, reason)
            self.solver.freeze(b, reason)

    def freeze(self, value: RawValue, reason: str) -> None:
        for layout in iter_layouts(value):
            self.solver.freeze(layout, reason)

    def consume(self, layout: RawValue, node: Node) -> None:
        for lay in iter_layouts(layout):
            self.solver.consume(lay, self.owner(node))

    def opaque(self, node: Node, reason: str, info: Any = ..., dim: int = 1) -> RawValue:
        """Fresh frozen channel spaces for every tensor the node outputs, on channel dim `dim`."""
        info = tensor_info(node) if info is ... else info  # (a tuple value may hold None: not "unset")
        if isinstance(info, TensorInfo):
            if len(info.shape) < 2 or not 0 <= dim < len(info.shape):
                return None
            return self.new_space(node, info.shape[dim], dim, kind="opaque", frozen=reason)
        if isinstance(info, tuple):
            return tuple(self.opaque(node, reason, i, dim) for i in info)
        return None

    def block(self, node: Node, why: str) -> RawValue:
        """The node uses channels in a way the search cannot follow: freeze what it touches, in and out."""
        self.set_role(node, "blocks")
        reason = f"{self.where(node)} {why}"
        for arg in iter_nodes((node.args, node.kwargs)):
            self.freeze(self.layout(arg), reason)
        return self.opaque(node, reason, dim=_kept_dim(node, self.layout(node.args[0]) if node.args else None))


def _kept_dim(node: Node, source: RawValue) -> int:
    """Where the output's channels lie: the first input's channel dim when the rank is unchanged (a
    LayerNorm, or an unknown op that pads H and W of an [N, H, W, C] tensor, keeps C last); the last dim when
    a channels-last input changes rank; else dim 1."""
    out, src = tensor_info(node), tensor_info(node.args[0]) if node.args and isinstance(node.args[0], Node) else None
    if isinstance(out, tuple):  # (output, attention weights) of an attention module: the output's dims
        out = next((i for i in out if isinstance(i, TensorInfo)), None)
    if isinstance(source, RawLayout) and isinstance(out, TensorInfo) and isinstance(src, TensorInfo):
        if len(out.shape) == len(src.shape):
            return source.dim
        if source.dim == len(src.shape) - 1 and source.dim != 1:
            return len(out.shape) - 1
    return 1


def iter_layouts(value: RawValue) -> Iterator[RawLayout]:
    if isinstance(value, RawLayout):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_layouts(v)


def iter_nodes(value: Any) -> Iterator[Node]:
    if isinstance(value, Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_nodes(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_nodes(v)


def first_layout(ctx: RuleContext, node: Node) -> RawLayout | None:
    lay = ctx.layout(node.args[0]) if node.args else None
    return lay if isinstance(lay, RawLayout) else None


def out_shape(node: Node) -> tuple[int, ...] | None:
    info = tensor_info(node)
    return info.shape if isinstance(info, TensorInfo) else None


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim
