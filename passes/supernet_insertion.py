"""supernet-insertion: turn conv blocks of an analysed graph into choice points of the path method.

A block is found on the IR, not by module names: a Conv1d/Conv2d with groups=1, then (if it is the conv's only
user) its BatchNorm, then (if it is the only user) its activation. Each block becomes one `ChoicePoint` node,
registered under the conv's name, whose alternatives are the seed block itself (first) and those the
`AlternativeSelection` names for that layer and that keep the block's output shape. A `duccio_fx.Choice` of
the model file (found through torch.fx's `nn_module_stack`) becomes a choice point over its own alternatives.

Every conv/linear layer that stays as it is gets a reason in `fixed` (first layer, head, shortcut, grouped,
no alternative applies, kept by a rule). Each option's layers are analysed on the block's input shape and
recorded on the node (`ChoiceInfo`) under the names the exported model will give them, which is what makes
the path method's costs equal to the exported model's.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.terms import is_head
from duccio_fx.ir.meta import (ChoiceInfo, ChoiceOption, LayerTerm, TensorInfo, layer_term, layer_terms,
                               set_choice_info, set_tensor_info, source_line, tensor_info)
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.registry import REGISTRY, OpRegistry
from duccio_fx.search.alternatives import BUILDERS, NONE, AlternativeSelection, BlockSpec, NotApplicable, seed_block
from duccio_fx.search.choice import Choice
from duccio_fx.search.choice_point import ChoicePoint

_CONVS = (nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class SupernetInsertion(Pass):
    """Needs layer-costs. Results: `points` (choice point names, graph order) and `fixed` (layer → reason).

    `analyze(module, example)` is the analysis pipeline (given by the caller, which stands above it): it
    measures each option's layers on the block's input."""

    analyze: Callable[[nn.Module, torch.Tensor], GraphModule]
    selection: AlternativeSelection = field(default_factory=AlternativeSelection)
    declared: dict[str, Choice] = field(default_factory=dict)  # the model's own Choices, by qualified name
    estimator: str = "all"
    registry: OpRegistry = field(default_factory=lambda: REGISTRY)  # its "activation" hooks name activations
    points: list[str] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)
    name = "supernet-insertion"
    requires = ("shape-propagation", "layer-costs")

    def run(self, gm: GraphModule) -> bool:
        replaced: set[str] = set()
        for path, choice in self.declared.items():
            names, rule = self.selection.for_layer(path)
            region = [n for n in gm.graph.nodes if _outer_choice(n) == path]
            if not region and not any(path.startswith(outer + ".") for outer in self.declared):
                raise DuccioError(f"Choice '{path}' does not appear in the traced graph", where=f"Choice '{path}'",
                                  fix="call it in forward(), and put an alternative that computes something first "
                                      "(the first alternative is what the seed runs)")
            if not region:
                continue  # nested inside another Choice's alternative: runs as that alternative's part
            if names == (NONE,):
                for t in (layer_term(n) for n in region):
                    if t is not None:
                        self.fixed[t.name] = f"in Choice '{path}', kept at its first alternative by {rule.text!r}"
                replaced.update(str(n.target) for n in region if n.op == "call_module")
                continue
            self._declared_point(gm, path, choice, region)
            replaced.update(str(n.target) for n in region if n.op == "call_module")
        auto = self.selection.explicit or not self.declared
        upstream, downstream = _layer_reach(gm)
        for node in list(gm.graph.nodes):
            term = layer_term(node)
            if term is None or term.name in replaced:
                continue
            reason = self._block_point(gm, node, auto, upstream, downstream)
            if reason:
                self.fixed[term.name] = reason
        self.selection.check_all_matched()
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        self.points.sort(key=lambda p: order.get(_node_of(gm, p).name, 0))
        gm.delete_all_unused_submodules()
        gm.recompile()
        return bool(self.points)

    # -- conv blocks ---------------------------------------------------------------------------------
    def _block_point(self, gm: GraphModule, conv: Node, auto: bool, upstream: set[Node], downstream: set[Node]) -> str:
        """Make `conv`'s block a choice point; returns why it stays fixed ('' when it became a point)."""
        module = gm.get_submodule(str(conv.target))
        if not auto:
            return "the model declares its own Choices, so only those are searched (add --alternatives to search " \
                   "conv blocks too)"
        if type(module) not in _CONVS:
            kind = "linear layer" if isinstance(module, nn.Linear) else f"{type(module).__name__}"
            return f"{kind}: the alternatives replace Conv1d/Conv2d blocks"
        if module.groups != 1:
            return "depthwise conv" if module.groups == module.in_channels else f"grouped conv (groups={module.groups})"
        if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
            return "dilated or non-zero-padded conv: the alternatives would not keep its receptive field"
        if conv not in upstream:
            return "first layer: it reads the model input"
        if conv not in downstream:
            return "head: no conv/linear layer after it"
        if sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == conv.target) > 1:
            return "its module is called more than once"
        source = conv.args[0]
        if not isinstance(source, Node) or not isinstance(tensor_info(source), TensorInfo):
            return "its input is not a single tensor"
        chain = _block_chain(gm, conv, self.registry)
        if _is_shortcut(source, chain[-1]):
            return "shortcut: a one-layer branch into a residual add"
        names, rule = self.selection.for_layer(str(conv.target))
        if names == (NONE,):
            return f"kept by --alternatives {rule.text!r}"
        bn_node = next((n for n in chain[1:] if n.op == "call_module" and
                        isinstance(gm.get_submodule(str(n.target)), _NORMS)), None)
        bn = gm.get_submodule(str(bn_node.target)) if bn_node is not None else None
        act = _activation_module(gm, chain[-1], self.registry) if chain[-1] is not conv and chain[-1] is not bn_node \
            else None
        block = BlockSpec(str(conv.target), module, bn, act, _one(tensor_info(source).shape),
                          _one(tensor_info(chain[-1]).shape))
        options: dict[str, nn.Module] = {block.seed_name(): seed_block(block)}
        skipped = []
        for name in names:
            if name in options:
                continue
            try:
                alt = BUILDERS[name](block)
            except NotApplicable as why:
                skipped.append(f"{name}: {why}")
                continue
            shape = _output_shape(alt, block.in_shape)
            if shape != block.out_shape:
                skipped.append(f"{name}: gives shape {list(shape)}, the block gives {list(block.out_shape)}")
                continue
            options[name] = alt
        if len(options) == 1:
            return "no alternative keeps its output shape (" + "; ".join(skipped) + ")" if skipped else \
                f"only its own block is allowed by {rule.text!r}"
        self._insert(gm, block.name, options, source, chain, declared=False)
        return ""

    # -- the model's own Choices ----------------------------------------------------------------------
    def _declared_point(self, gm: GraphModule, path: str, choice: Choice, region: list[Node]) -> None:
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        where = f"Choice '{path}'" + (f" ({source_line(region[0])})" if source_line(region[0]) else "")
        if len(inputs) != 1 or len(outputs) != 1:
            raise DuccioError(f"a Choice must take one tensor and return one; '{path}' takes {len(inputs)} and "
                              f"returns {len(outputs)}", where=where,
                              fix="wrap a block with a single tensor input and output in duccio_fx.Choice")
        source, last = inputs.pop(), outputs[0]
        in_info, out_info = tensor_info(source), tensor_info(last)
        if not isinstance(in_info, TensorInfo) or not isinstance(out_info, TensorInfo):
            raise DuccioError(f"'{path}' does not map a tensor to a tensor", where=where,
                              fix="wrap a block with a single tensor input and output in duccio_fx.Choice")
        in_shape, out_shape = _one(in_info.shape), _one(out_info.shape)
        options: dict[str, nn.Module] = {}
        for name, alt in choice.named_children():
            try:
                shape = _output_shape(alt, in_shape)
            except Exception as err:  # the user's module failed on the block's input
                raise DuccioError(f"alternative {name!r} of '{path}' fails on the block's input {list(in_shape)}: "
                                  f"{err}", where=where, fix="make every alternative accept the same input") from None
            if shape != out_shape:
                raise DuccioError(f"alternative {name!r} of '{path}' gives shape {list(shape)}, the first alternative "
                                  f"gives {list(out_shape)}", where=where,
                                  fix="make every alternative of a Choice produce the same output shape "
                                      "(channels, stride, padding)")
            options[name] = copy.deepcopy(alt)
        self._insert(gm, path, options, source, [n for n in gm.graph.nodes if n in inside], declared=True)

    # -- the rewrite ------------------------------------------------------------------------------------
    def _insert(self, gm: GraphModule, path: str, options: dict[str, nn.Module], source: Node, region: list[Node],
                declared: bool) -> None:
        last = next(n for n in reversed(region) if any(u not in region for u in n.users))
        info = tensor_info(last)
        gm.add_submodule(path, ChoicePoint(options, self.estimator))
        with gm.graph.inserting_after(last):
            node = gm.graph.call_module(path, (source,))
        last.replace_all_uses_with(node)
        for n in reversed(region):
            gm.graph.erase_node(n)
        set_tensor_info(node, info)
        head = is_head(node)
        in_shape = _one(tensor_info(source).shape)
        set_choice_info(node, ChoiceInfo(path, tuple(
            ChoiceOption(name, _option_terms(self.analyze, f"{path}.{name}", alt, in_shape, head))
            for name, alt in options.items()), declared))
        self.points.append(path)


def _one(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) + tuple(shape[1:])


def _output_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(in_shape))
    module.train(was)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def _option_terms(analyze: Callable[[nn.Module, torch.Tensor], GraphModule], prefix: str, module: nn.Module,
                  in_shape: tuple[int, ...], head: bool) -> tuple[LayerTerm, ...]:
    """The option's layers, analysed on the block's input, named as in the exported model."""
    if not any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules()):
        return ()
    gm = analyze(module, torch.zeros(in_shape))
    # inside the option a last layer looks like a model output; in the model it is one only if the point is
    return tuple(replace(t, name=f"{prefix}.{t.name}", requant=t.requant or not head) for t in layer_terms(gm))


def _outer_choice(node: Node) -> str | None:
    """The qualified name of the outermost duccio_fx.Choice the node was traced inside, if any."""
    for path, (_, kind) in (node.meta.get("nn_module_stack") or {}).items():
        if isinstance(kind, type) and issubclass(kind, Choice):
            return path
    return None


def _node_of(gm: GraphModule, target: str) -> Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def _layer_reach(gm: GraphModule) -> tuple[set[Node], set[Node]]:
    """Nodes with a conv/linear layer upstream of them, and nodes with one downstream."""
    upstream: set[Node] = set()
    for n in gm.graph.nodes:
        if any(a in upstream or layer_term(a) is not None for a in n.all_input_nodes):
            upstream.add(n)
    downstream: set[Node] = set()
    for n in reversed(list(gm.graph.nodes)):
        if any(u in downstream or layer_term(u) is not None for u in n.users):
            downstream.add(n)
    return upstream, downstream


def _block_chain(gm: GraphModule, conv: Node, registry: OpRegistry) -> list[Node]:
    """conv, then its BatchNorm and activation when each is the only user of what precedes it."""
    chain = [conv]
    nxt = _only_user(conv)
    if nxt is not None and nxt.op == "call_module" and isinstance(gm.get_submodule(str(nxt.target)), _NORMS):
        chain.append(nxt)
        nxt = _only_user(nxt)
    if nxt is not None and _activation_module(gm, nxt, registry) is not None and nxt.args and nxt.args[0] is chain[-1]:
        chain.append(nxt)
    return chain


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _activation_module(gm: GraphModule, node: Node, registry: OpRegistry) -> nn.Module | None:
    """A module computing the activation `node` computes (from the op's "activation" hook), or None."""
    hook = registry.hook(gm, node, "activation")
    return hook(gm, node) if hook is not None else None


def _is_shortcut(source: Node, end: Node) -> bool:
    """The block reads a tensor other layers also read and feeds a residual add whose other operand comes
    from that same tensor: a one-layer branch beside the main path."""
    if len(source.users) < 2:
        return False
    for add in end.users:
        if not _is_add(add):
            continue
        for other in add.all_input_nodes:
            if other is not end and (other is source or _descends(other, source)):
                return True
    return False


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in
                                                                     ("add", "add_"))


def _descends(node: Node, ancestor: Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False
