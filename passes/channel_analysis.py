"""channel-analysis: find which output channels are coupled and must be kept or removed together.

Walks the graph in order, applies each node's registry rule (`duccio_fx.ir.rules`), then resolves the
recorded constraints into `ChannelGroup`s. Writes `duccio_role` and `duccio_channels` on every node and
the group list on `gm.meta`. An op the registry does not know freezes the groups it touches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.channels import Atom, ChannelSolver, RawLayout
from duccio_fx.ir.meta import (GROUPS_KEY, ChannelLayout, GroupSlice, LayoutInfo, OpRole, TensorInfo, ValueInfo,
                            set_channel_layout, set_op_role, tensor_info)
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir import builtin_rules  # noqa: F401  (fills the default registry)
from duccio_fx.ir.registry import REGISTRY, OpRegistry, describe_target
from duccio_fx.ir.rule_api import RawValue, RuleContext, iter_nodes


def _fits(value: RawValue, info: ValueInfo) -> bool:
    """Does a rule's layout describe the recorded tensor (right dim, right width)?"""
    if value is None:
        return True
    if isinstance(value, RawLayout):
        return isinstance(info, TensorInfo) and 0 <= value.dim < len(info.shape) \
            and info.shape[value.dim] == value.width
    if isinstance(value, tuple):
        return isinstance(info, tuple) and len(info) == len(value) and all(map(_fits, value, info))
    return False


@dataclass
class ChannelAnalysis(Pass):
    """Computes channel groups with the rules of `registry` (the global registry by default)."""

    registry: OpRegistry = field(default_factory=lambda: REGISTRY)
    name = "channel-analysis"
    requires = ("shape-propagation",)

    def run(self, gm: GraphModule) -> bool:
        solver = ChannelSolver()
        ctx = RuleContext(gm, solver, self.registry)
        for node in gm.graph.nodes:
            ctx.layouts[node] = self._apply(ctx, gm, node)
        groups, atoms = solver.resolve()
        starts = {sid: [a.start for a, _ in pieces] for sid, pieces in atoms.items()}
        for node in gm.graph.nodes:
            set_op_role(node, OpRole(ctx.roles.get(node, "unknown"), self._rule_name(gm, node)))
            set_channel_layout(node, _resolve(ctx.layouts[node], atoms, starts))
        gm.meta[GROUPS_KEY] = tuple(groups)
        return False

    def _rule_name(self, gm: GraphModule, node: Node) -> str:
        rule = self.registry.lookup(gm, node)
        return rule.name if rule else node.op

    def _apply(self, ctx: RuleContext, gm: GraphModule, node: Node) -> RawValue:
        if node.op == "placeholder":
            ctx.set_role(node, "input")
            return ctx.opaque(node, f"model input '{node.name}': its channels are fixed by the data")
        if node.op == "get_attr":
            ctx.set_role(node, "constant")
            return None
        if node.op == "output":
            ctx.set_role(node, "output")
            for arg in iter_nodes(node.args):
                ctx.freeze(ctx.layouts.get(arg), f"model output '{arg.name}': the model's outputs keep "
                                                 f"their size (e.g. the number of classes)")
            return None
        rule = self.registry.lookup(gm, node)
        if rule is None:
            hint = (f"duccio_fx.register_module({type(gm.get_submodule(str(node.target))).__name__}, 'follows')"
                    if node.op == "call_module" else
                    f"duccio_fx.register_function({describe_target(gm, node)}, 'follows')"
                    if node.op == "call_function" else
                    f"duccio_fx.register_method('{node.target}', 'follows')")
            return ctx.block(node, f"is not in the op registry, so duccio-fx cannot tell how it uses "
                                   f"channels (if it acts on each channel separately, register it: {hint})")
        value = rule.apply(ctx, node)
        if not _fits(value, tensor_info(node)):
            return ctx.block(node, f"got a channel layout from rule '{rule.name}' that does not match its "
                                   f"output shape {tensor_info(node)}")
        return self._share_weights(ctx, node, value)

    @staticmethod
    def _share_weights(ctx: RuleContext, node: Node, value: RawValue) -> RawValue:
        """A module called more than once has one set of weights: every call reads the same input channels
        and, when it defines channels, writes the same output channels as its first call."""
        if node.op != "call_module" or not _holds_weights(ctx.module(node)):
            return value  # a ReLU or a pool called twice shares nothing that indexes channels
        first = ctx.first_call.setdefault(str(node.target), node)
        if first is node:
            return value
        ins = [ctx.layout(n.args[0]) if n.args else None for n in (first, node)]
        if all(isinstance(lay, RawLayout) for lay in ins) and ins[0].dim == ins[1].dim:
            ctx.couple(ins[0], ins[1], node)
        out = ctx.layout(first)
        if ctx.roles.get(node) == "defines" and isinstance(out, RawLayout) and isinstance(value, RawLayout):
            ctx.couple(out, value, node)
        return value


def _holds_weights(module: nn.Module) -> bool:
    """Does the module own a tensor with more than one entry (weights, per-channel statistics)?"""
    return any(t.numel() > 1 for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def _resolve(value: RawValue, atoms: dict[int, list[tuple[Atom, int]]],
             starts: dict[int, list[int]]) -> LayoutInfo:
    if isinstance(value, tuple):
        return tuple(_resolve(v, atoms, starts) for v in value)
    if not isinstance(value, RawLayout):
        return None
    slices: list[GroupSlice] = []
    for seg in value.segments:
        pieces = atoms[seg.space]
        i = bisect.bisect_right(starts[seg.space], seg.start) - 1
        while i < len(pieces) and pieces[i][0].start < seg.stop:
            atom, gid = pieces[i]
            lo, hi = max(seg.start, atom.start), min(seg.stop, atom.stop)
            if lo < hi:
                slices.append(GroupSlice(gid, lo - atom.start, hi - atom.start, seg.block))
            i += 1
    return ChannelLayout(value.dim, tuple(slices))

