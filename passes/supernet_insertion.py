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

The seed alternative holds the seed's own conv and BatchNorm (not copies), and every other use of their
parameters and buffers (a `get_attr`, e.g. `x.to(self.conv.weight.dtype)`) is pointed at them there.

The pass scales linearly with the number of choice points: no weights are copied, output shapes are checked
with convolutions that give only their output's shape (`_shapes_only`), and the layers of every option of every
point are analysed in one run of the analysis pipeline, on one module holding all of them (`_OptionAnalysis`),
not one run per option. What remains per point is building its alternatives (their weights' initialisation).
"""

from __future__ import annotations

import operator
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.terms import is_head
from duccio_fx.ir.meta import (GROUPS_KEY, ChannelSpec, ChoiceInfo, ChoiceOption, LayerTerm, TensorInfo, channel_layout,
                               layer_term, set_channel_layout, set_choice_info, set_tensor_info, source_line,
                               tensor_info)
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

    `analyze(module, example_inputs)` is the analysis pipeline (given by the caller, which stands above it): it
    measures each option's layers on the block's input. The pass calls it once for all the options of all the
    points (`analyze_calls` counts the calls)."""

    analyze: Callable[[nn.Module, Any], GraphModule]
    selection: AlternativeSelection = field(default_factory=AlternativeSelection)
    declared: dict[str, Choice] = field(default_factory=dict)  # the model's own Choices, by qualified name
    estimator: str = "all"
    # the default set offers no alternative whose MACs exceed this many times the seed block's (None: no limit);
    # one named in --alternatives is always offered
    max_cost_ratio: float | None = 4.0
    registry: OpRegistry = field(default_factory=lambda: REGISTRY)  # its "activation" hooks name activations
    points: list[str] = field(default_factory=list)
    fixed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)  # point → {alternative: why not offered}
    analyze_calls: int = 0
    name = "supernet-insertion"
    requires = ("shape-propagation", "layer-costs")

    def run(self, gm: GraphModule) -> bool:
        self._options = _OptionAnalysis()
        self._nodes: dict[str, Node] = {}  # point → its node
        self._attr_uses = _attr_uses(gm)  # module path → get_attr nodes reading inside it
        self._order: dict[Node, int] = {}
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
        self._calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        self._order = {n: i for i, n in enumerate(gm.graph.nodes)}  # lets the shortcut test stop early
        for node in list(gm.graph.nodes):
            term = layer_term(node)
            if term is None or term.name in replaced:
                continue
            reason = self._block_point(gm, node, auto, upstream, downstream)
            if reason:
                self.fixed[term.name] = reason
        self.selection.check_all_matched()
        self._options.run(self._analyze)
        for path in self.points:
            node = self._nodes[path]
            info = self._options.pending[path]
            head = is_head(node)
            set_choice_info(node, ChoiceInfo(path, tuple(ChoiceOption(name, self._options.terms(path, name, head))
                                                         for name in info.names), info.declared))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.points.sort(key=lambda p: order[self._nodes[p]])
        gm.delete_all_unused_submodules()
        gm.recompile()
        return bool(self.points)

    def _analyze(self, module: nn.Module, example_inputs: Any) -> GraphModule:
        self.analyze_calls += 1
        return self.analyze(module, example_inputs)

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
        if self._calls[conv.target] > 1:
            return "its module is called more than once"
        source = conv.args[0]
        if not isinstance(source, Node) or not isinstance(tensor_info(source), TensorInfo):
            return "its input is not a single tensor"
        chain = _block_chain(gm, conv, self.registry)
        if _is_shortcut(source, chain[-1], self._order):
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
        limit = self.max_cost_ratio if rule.pattern is None and not self.selection.explicit else None
        seed_macs = _conv_macs(options[block.seed_name()], block.in_shape) if limit is not None else 0
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
            if limit is not None and seed_macs > 0 and (ratio := _conv_macs(alt, block.in_shape) / seed_macs) > limit:
                self.dropped.setdefault(block.name, {})[name] = (
                    f"{ratio:.1f}x the seed block's MACs (the default set stops at {limit:g}x; name it in "
                    "--alternatives to offer it)")
                continue
            options[name] = alt
        if len(options) == 1:
            return "no alternative keeps its output shape (" + "; ".join(skipped) + ")" if skipped else \
                f"only its own block is allowed by {rule.text!r}"
        self._insert(gm, block.name, options, source, chain, declared=False)
        # the seed alternative owns the seed's conv and BatchNorm: other uses of their tensors read them there
        seed = f"{block.name}.{next(iter(options))}"
        for old, part in ((block.name, "conv"), (str(bn_node.target) if bn_node is not None else None, "bn")):
            for use in self._attr_uses.get(old, []) if old is not None else []:
                use.target = f"{seed}.{part}{str(use.target)[len(old):]}"
        if bn_node is not None and self._calls[bn_node.target] == 1:
            gm.delete_submodule(str(bn_node.target))  # it lives in the seed alternative now (one name per module)
        return ""

    # -- the model's own Choices ----------------------------------------------------------------------
    def _declared_point(self, gm: GraphModule, path: str, choice: Choice, region: list[Node]) -> None:
        inside = set(region)
        inputs = {a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"}
        # a parameter of an alternative that the model also reads elsewhere is not an output of the Choice
        outputs = [n for n in region if n.op != "get_attr" and any(u not in inside for u in n.users)]
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
            # the alternatives themselves, not copies: the point takes the Choice's place and names, so other
            # uses of their parameters keep reading the ones the search trains
            options[name] = alt
        self._insert(gm, path, options, source, [n for n in gm.graph.nodes if n in inside and n.op != "get_attr"],
                     declared=True)
        for n in reversed(region):
            if n.op == "get_attr" and not n.users:
                gm.graph.erase_node(n)

    # -- the rewrite ------------------------------------------------------------------------------------
    def _insert(self, gm: GraphModule, path: str, options: dict[str, nn.Module], source: Node, region: list[Node],
                declared: bool) -> None:
        """Replace `region` by a call of a ChoicePoint; the options' layers are analysed later, all at once."""
        members = set(region)
        last = next(n for n in reversed(region) if any(u not in members for u in n.users))
        info = tensor_info(last)
        gm.add_submodule(path, ChoicePoint(options, self.estimator))
        with gm.graph.inserting_after(last):
            node = gm.graph.call_module(path, (source,))
        last.replace_all_uses_with(node)
        for n in reversed(region):
            gm.graph.erase_node(n)
        set_tensor_info(node, info)
        set_channel_layout(node, channel_layout(last))  # the block's output channels (path+mask masks them)
        if last in self._order:
            self._order[node] = self._order[last]
        self._options.add(path, options, _one(tensor_info(source).shape), declared)
        self._nodes[path] = node
        self.points.append(path)


@dataclass
class _Pending:
    names: list[str]
    declared: bool


class _OptionAnalysis:
    """The layers of every option of every choice point, from one run of the analysis pipeline.

    All options go into one GraphModule that feeds option i its own input `x{i}` (the block's input shape)
    and returns every output; each option's layer terms are then those under `o{i}.`, renamed as the exported
    model names them, with their channel groups numbered as the option's own analysis numbers them: the terms
    equal those of analysing each option alone. The run is `_shapes_only` (no convolution computed); options
    that need their convolutions' values are analysed with them. Options that share a module object go into
    separate bundles (a traced module has one name)."""

    def __init__(self) -> None:
        self.pending: dict[str, _Pending] = {}
        self._entries: list[tuple[str, str, nn.Module, tuple[int, ...]]] = []  # point, option, module, input
        self._terms: dict[tuple[str, str], tuple[LayerTerm, ...]] = {}

    def add(self, point: str, options: dict[str, nn.Module], in_shape: tuple[int, ...], declared: bool) -> None:
        self.pending[point] = _Pending(list(options), declared)
        for name, module in options.items():
            if any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in module.modules()):
                self._entries.append((point, name, module, in_shape))
            else:
                self._terms[(point, name)] = ()

    def terms(self, point: str, name: str, head: bool) -> tuple[LayerTerm, ...]:
        # inside the option a last layer looks like a model output; in the model it is one only if the point is
        return tuple(replace(t, requant=t.requant or not head) for t in self._terms[(point, name)])

    def run(self, analyze: Callable[[nn.Module, Any], GraphModule]) -> None:
        bundles: list[tuple[list[int], set[int]]] = []
        for i, (_, _, module, _) in enumerate(self._entries):
            ids = {id(m) for m in module.modules()}
            target = next((b for b in bundles if not b[1] & ids), None)
            if target is None:
                bundles.append(([], set()))
                target = bundles[-1]
            target[0].append(i)
            target[1].update(ids)
        for indices, _ in bundles:
            self._run_bundle(analyze, [self._entries[i] for i in indices])
        self._entries = []

    def _run_bundle(self, analyze: Callable[[nn.Module, Any], GraphModule],
                    entries: Sequence[tuple[str, str, nn.Module, tuple[int, ...]]]) -> None:
        root = nn.Module()
        graph = torch.fx.Graph()
        xs = [graph.placeholder(f"x{i}") for i in range(len(entries))]
        outs = []
        for i, (_, _, module, _) in enumerate(entries):
            root.add_module(f"o{i}", module)
            outs.append(graph.call_module(f"o{i}", (xs[i],)))
        graph.output(tuple(outs))
        bundle = GraphModule(root, graph, "SupernetOptions")
        modules = [m for _, _, m, _ in entries]
        try:
            with _shapes_only(modules):
                gm = analyze(bundle, tuple(torch.zeros(s) for _, _, _, s in entries))
        except Exception:  # an op that needs the convolutions' values: analyse with them
            gm = analyze(bundle, tuple(torch.zeros(s) for _, _, _, s in entries))
        owner = _owners(gm)
        ranks: dict[int, dict[int, int]] = {}  # option → its groups, numbered from 0 in the bundle's order
        for gid, group in enumerate(gm.meta.get(GROUPS_KEY, ())):
            i = next((owner[m.node] for m in group.members if m.node in owner), None)
            if i is not None:
                local = ranks.setdefault(i, {})
                local[gid] = len(local)
        found: dict[int, list[LayerTerm]] = {}
        for n in gm.graph.nodes:
            t = layer_term(n)
            if t is None or owner.get(n.name) is None:
                continue
            i = owner[n.name]
            point, name, _, _ = entries[i]
            local = ranks.get(i, {})
            found.setdefault(i, []).append(replace(
                t, name=_rename(t.name, i, f"{point}.{name}"), in_spec=_renumber(t.in_spec, local),
                out_spec=_renumber(t.out_spec, local),
                shares_weights_of=_rename(t.shares_weights_of, i, "") if t.shares_weights_of else ""))
        for i, (point, name, _, _) in enumerate(entries):
            self._terms[(point, name)] = tuple(found.get(i, ()))


def _owners(gm: GraphModule) -> dict[str, int]:
    """Node name → the index of the bundled option it belongs to (its input `x{i}`, or a node inside `o{i}`)."""
    owner: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name.startswith("x"):
            owner[n.name] = int(n.name[1:])
            continue
        path = str(n.target) if n.op in ("call_module", "get_attr") else \
            next(iter(n.meta.get("nn_module_stack") or {}), "")
        head = path.split(".", 1)[0]
        if head[:1] == "o" and head[1:].isdigit():
            owner[n.name] = int(head[1:])
    return owner


def _rename(name: str, index: int, prefix: str) -> str:
    """`o3.conv` (a layer of option 3) → `<prefix>.conv`; `o3` (the option is the layer) → `<prefix>`."""
    own = f"o{index}"
    if name == own or name.startswith((own + ".", own + "#")):
        rest = name[len(own):]
    else:  # a node's own name (a layer that is not a module call)
        rest = "." + (name[len(own) + 1:] if name.startswith(own + "_") else name)
    if not prefix:
        return rest.lstrip(".")
    return prefix + rest


def _renumber(spec: ChannelSpec, ranks: dict[int, int]) -> ChannelSpec:
    return tuple((ranks.get(g, g) if g >= 0 else g, a, b, k) for g, a, b, k in spec)


@contextmanager
def _shapes_only(modules: Sequence[nn.Module]) -> Iterator[None]:
    """While active, every Conv1d/2d/3d among these modules returns zeros of its output shape instead of
    convolving, and every BatchNorm returns its input (activations and the rest still run): what an analysis
    of shapes and layers needs, without the arithmetic (or the thread start-up) of every alternative's layers.
    A module given an input it does not fit runs for real, so its own error comes out."""
    patched = []
    try:
        for root in modules:
            for m in root.modules():
                if "forward" in m.__dict__:
                    continue
                if type(m) in _SHAPE_CONVS:
                    m.forward = _conv_shape(m)
                elif type(m) in _SHAPE_NORMS:
                    m.forward = _norm_shape(m)
                else:
                    continue
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


_SHAPE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_SHAPE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv_shape(conv: nn.modules.conv._ConvNd) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dims = len(conv.kernel_size)
        if x.dim() != dims + 2 or x.shape[1] != conv.in_channels:
            return type(conv).forward(conv, x)
        pads = conv.padding if isinstance(conv.padding, tuple) else (0,) * dims  # "valid"; "same" keeps sizes
        sizes = [size if conv.padding == "same" else (size + 2 * p - d * (k - 1) - 1) // s + 1
                 for size, k, s, d, p in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation, pads)]
        return x.new_zeros((x.shape[0], conv.out_channels, *sizes))
    return forward


def _norm_shape(norm: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != norm.num_features:
            return type(norm).forward(norm, x)
        return x
    return forward


def _one(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) + tuple(shape[1:])


def _conv_macs(module: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of the convolutions of `module` on one input of `in_shape` (shapes only)."""
    total = 0

    def count(conv: nn.Module, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        per_output = conv.in_channels // conv.groups
        for k in conv.kernel_size:
            per_output *= k
        total += out.numel() * per_output

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, _SHAPE_CONVS)]
    try:
        _output_shape(module, in_shape)
    finally:
        for h in hooks:
            h.remove()
    return total


def _output_shape(module: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The module's output shape on zeros of `in_shape`, in eval mode, its convolutions giving only shapes."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            try:
                with _shapes_only([module]):
                    out = module(torch.zeros(in_shape))
            except Exception:  # an op that needs the convolutions' values: run them (and let an error out)
                out = module(torch.zeros(in_shape))
    finally:
        module.train(was)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def _attr_uses(gm: GraphModule) -> dict[str, list[Node]]:
    """Module path → the get_attr nodes that read a tensor inside that module (at any depth)."""
    uses: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            parts = str(n.target).split(".")
            for k in range(1, len(parts)):
                uses.setdefault(".".join(parts[:k]), []).append(n)
    return uses


def _outer_choice(node: Node) -> str | None:
    """The qualified name of the outermost duccio_fx.Choice the node was traced inside, if any."""
    for path, (_, kind) in (node.meta.get("nn_module_stack") or {}).items():
        if isinstance(kind, type) and issubclass(kind, Choice):
            return path
    return None


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


def _is_shortcut(source: Node, end: Node, order: dict[Node, int]) -> bool:
    """The block reads a tensor other layers also read and feeds a residual add whose other operand comes
    from that same tensor: a one-layer branch beside the main path. `order` (graph positions) lets the search
    upwards stop at nodes before `source`."""
    if len(source.users) < 2:
        return False
    for add in end.users:
        if not _is_add(add):
            continue
        for other in add.all_input_nodes:
            if other is not end and (other is source or _descends(other, source, order)):
                return True
    return False


def _is_add(node: Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target in
                                                                     ("add", "add_"))


def _descends(node: Node, ancestor: Node, order: dict[Node, int]) -> bool:
    floor = order.get(ancestor, -1)
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is ancestor:
            return True
        if n in seen or order.get(n, floor + 1) < floor:  # a node before the ancestor cannot descend from it
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False
