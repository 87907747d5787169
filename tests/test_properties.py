"""Property tests: random CNNs go through `duccio_fx.analyze`, and the channel analysis must keep its invariants.

A `Plan` (plain Python data, printed by hypothesis on failure) describes a network as a list of blocks applied
to a running tensor [N, C, H, W] (or [N, C, L] for Conv1d networks) followed by a classifier head. `Net`
builds the modules from it; fx unrolls the loop over the blocks. Every generated model is well formed and
uses only ops the registry knows, so nothing may block: the only reasons to freeze a group are the model
input, the model output and grouped convolutions (plus, after a depthwise channel multiplier, a residual
add or squeeze-excite multiply that duccio-fx cannot match against the repeated channels).

Invariants (numbered as in `check_structure` / `check_all`):
 1. `analyze` does not raise;
 2. every layout is as wide as the recorded tensor at its dim;
 3. every slice lies inside its group, and every group appears in some layout;
 4. add / mul of two full-width operands: both operands (and the output) have the same slices, or the
    groups involved are frozen;
 5. torch.cat on dim 1: the output's slices are the inputs' slices one after another;
 6. members are whole groups of real graph nodes; searchable groups are produced by convs / linears;
 7. model input, model output and both sides of a grouped conv are frozen, with the reason;
 8. group ids are 0..n-1 and a second analysis gives the same groups, members and layouts;
 9. semantic check of the coupling claim (`check_zeroing`): zeroing channel c of a searchable group g in
    the output of every producer the group lists must make *every* tensor entry the layouts map to (g, c)
    exactly zero. The models are built so that every op on the way maps a zero channel to zero (BatchNorm
    with zero bias and running mean, depthwise and grouped convs without bias, ReLU, pooling, residual add,
    the squeeze-excite multiply); sigmoid (0 → 0.5) is not checked itself, only through the multiply it
    feeds. A missed coupling or a wrong offset in a layout leaves a non-zero there.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

import duccio_fx
from duccio_fx import ChannelGroup
from duccio_fx.ir.meta import ChannelLayout, TensorInfo, channel_layout, op_role, tensor_info

MAX_C = 16  # the running channel count stays in [2, MAX_C]
BATCH = 2
CLASSES = 3


# --------------------------------------------------------------------------------------------------
# the model generator
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    dims: int  # 2: Conv2d network on [N, C, S, S]; 1: Conv1d network on [N, C, S]
    channels: int
    size: int
    blocks: tuple[tuple[Any, ...], ...]
    head: tuple[Any, ...]  # (kind, spelling, hidden width or 0)


def _conv(dims: int, cin: int, cout: int, k: int = 3, **kw: Any) -> nn.Module:
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(cin, cout, k, padding=k // 2, **kw)


def _bn(dims: int, c: int) -> nn.Module:
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(c)
    with torch.no_grad():  # non-trivial scale, but zero bias and mean: BN(0) == 0 in eval mode
        bn.weight.uniform_(0.5, 1.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _conv_block(dims: int, cin: int, cout: int, k: int = 3, bn: bool = False, relu: bool = False,
                **kw: Any) -> nn.Sequential:
    layers = [_conv(dims, cin, cout, k, **kw)]
    if bn:
        layers.append(_bn(dims, cout))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ConvB(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int, k: int, bn: bool, relu: bool) -> None:
        super().__init__()
        self.body = _conv_block(dims, cin, cout, k, bn, relu)

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self, dims: int, c: int, k: int, bn: bool, relu: bool) -> None:
        super().__init__()
        self.body = _conv_block(dims, c, c, k, bn)
        self.relu = relu

    def forward(self, x):
        y = x + self.body(x)
        return torch.relu(y) if self.relu else y


class Concat(nn.Module):
    def __init__(self, dims: int, cin: int, c1: int, c2: int, bn: bool) -> None:
        super().__init__()
        self.a = _conv_block(dims, cin, c1, 3, bn, True)
        self.b = _conv_block(dims, cin, c2, 1, bn, False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class NestedConcat(nn.Module):
    """cat(cat(a(x), b(x)), c(x) or x) — the identity variant is a DenseNet-style concat."""

    def __init__(self, dims: int, cin: int, c1: int, c2: int, c3: int) -> None:
        super().__init__()
        self.a, self.b = _conv_block(dims, cin, c1, 3), _conv_block(dims, cin, c2, 1, relu=True)
        self.c = _conv_block(dims, cin, c3, 3) if c3 else nn.Identity()

    def forward(self, x):
        inner = torch.cat([self.a(x), self.b(x)], 1)
        return torch.cat((inner, self.c(x)), 1)


class Split(nn.Module):
    """Cut the channels into pieces (split / chunk / slicing), transform each (conv or identity), concat."""

    def __init__(self, dims: int, how: str, sizes: tuple[int, ...], outs: tuple[int, ...], chunks: int) -> None:
        super().__init__()
        self.how, self.sizes, self.chunks = how, sizes, chunks
        self.bounds = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(len(sizes))]
        self.convs = nn.ModuleList(_conv_block(dims, s, o, 3, relu=True) if o else nn.Identity()
                                   for s, o in zip(sizes, outs))

    def forward(self, x):
        if self.how == "split":
            pieces = torch.split(x, list(self.sizes), dim=1)
        elif self.how == "chunk":
            pieces = x.chunk(self.chunks, 1)
        else:
            pieces = [x[:, a:b] for a, b in self.bounds]
        ys = []
        for i, conv in enumerate(self.convs):
            ys.append(conv(pieces[i]))
        return torch.cat(ys, dim=1)


class Depthwise(nn.Module):
    def __init__(self, dims: int, c: int, mult: int, bn: bool, relu: bool) -> None:
        super().__init__()
        self.body = _conv_block(dims, c, c * mult, 3, bn, relu, groups=c, bias=False)

    def forward(self, x):
        return self.body(x)


class Grouped(nn.Module):
    def __init__(self, dims: int, cin: int, cout: int) -> None:
        super().__init__()
        self.body = _conv_block(dims, cin, cout, 3, relu=True, groups=2, bias=False)

    def forward(self, x):
        return self.body(x)


class SqueezeExcite(nn.Module):
    def __init__(self, dims: int, c: int, r: int) -> None:
        super().__init__()
        self.space = (2, 3) if dims == 2 else (2,)
        self.reduce, self.expand = _conv(dims, c, r, 1), _conv(dims, r, c, 1)

    def forward(self, x):
        s = x.mean(self.space, keepdim=True)
        return x * torch.sigmoid(self.expand(torch.relu(self.reduce(s))))


class ChannelsLastMLP(nn.Module):
    """Channels moved last (permute / transpose), an optional LayerNorm over them, Linear → GELU → Linear on
    the last dim, an optional layer scale, channels moved back, and a residual when the width is kept."""

    def __init__(self, dims: int, cin: int, hidden: int, cout: int, norm: bool, scale: bool) -> None:
        super().__init__()
        self.dims = dims
        self.norm = nn.LayerNorm(cin) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(cin, hidden), nn.Linear(hidden, cout)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, cout)) if scale else None
        self.residual = cin == cout

    def forward(self, x):
        y = x.permute(0, 2, 3, 1) if self.dims == 2 else x.transpose(1, 2)
        y = self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        y = (y.permute(0, 3, 1, 2) if self.dims == 2 else y.transpose(1, 2)).contiguous()
        return x + y if self.residual else y


class Pool(nn.Module):
    def __init__(self, dims: int, kind: str) -> None:
        super().__init__()
        self.kind, self.dims = kind, dims
        self.pool = {"max": nn.MaxPool1d, "avg": nn.AvgPool1d}[kind](2) if dims == 1 else \
            {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[kind](2)

    def forward(self, x):
        return self.pool(x)


class Head(nn.Module):
    def __init__(self, dims: int, c: int, size: int, kind: str, spelling: str, hidden: int) -> None:
        super().__init__()
        self.kind, self.spelling, self.dims = kind, spelling, dims
        features = c * size ** dims if kind == "flatten" else c
        self.fc = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)) if hidden \
            else nn.Linear(features, CLASSES)

    def forward(self, x):
        if self.kind == "mean":
            x = x.mean((2, 3)) if self.dims == 2 else x.mean(-1)
        elif self.spelling == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.spelling == "view":
            x = x.view(x.size(0), -1)
        else:
            x = x.flatten(1)
        return self.fc(x)


BUILDERS = {"conv": ConvB, "res": Residual, "cat": Concat, "nested": NestedConcat, "split": Split,
            "dw": Depthwise, "grouped": Grouped, "se": SqueezeExcite, "pool": Pool, "mlp": ChannelsLastMLP}


class Net(nn.Module):
    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BUILDERS[b[0]](plan.dims, *b[1:]) for b in plan.blocks)
        c, size = plan.channels, plan.size
        for b in plan.blocks:
            c, size = _after(b, c, size)
        self.head = Head(plan.dims, c, size, *plan.head)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _after(block: tuple[Any, ...], c: int, size: int) -> tuple[int, int]:
    """Channels and spatial size of the running tensor after `block`."""
    kind = block[0]
    if kind == "conv":
        return block[2], size
    if kind == "cat":
        return block[2] + block[3], size
    if kind == "nested":
        return block[2] + block[3] + (block[4] or c), size
    if kind == "split":
        return sum(o or s for s, o in zip(block[2], block[3])), size
    if kind == "dw":
        return c * block[2], size
    if kind == "grouped":
        return block[2], size
    if kind == "pool":
        return c, size // 2
    if kind == "mlp":
        return block[3], size
    return c, size  # res, se


def _chunk_sizes(c: int, chunks: int) -> tuple[int, ...]:
    step = -(-c // chunks)
    return tuple(min(step, c - i) for i in range(0, c, step))


def _rep_after(block: tuple[Any, ...], rep: int | None) -> int | None:
    """How many times each channel repeats in the running tensor (a depthwise multiplier repeats them), or
    None once the layout mixes repeated and plain channels."""
    kind = block[0]
    if kind in ("conv", "cat", "grouped"):
        return 1
    if kind == "mlp":
        return 1 if block[1] != block[3] or rep == 1 else None
    if kind == "nested":
        return 1 if block[4] or rep == 1 else None
    if kind == "split":
        return 1 if rep == 1 or all(block[3]) else None
    if kind == "dw":
        return rep * block[2] if rep else None
    return rep


@st.composite
def _block(draw: st.DrawFn, c: int, size: int, rep: int | None) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(["conv", "res", "cat", "nested", "split", "dw", "grouped", "se", "pool", "mlp"]))
    flag = st.booleans()
    if kind == "mlp":
        return ("mlp", c, draw(st.integers(2, 2 * MAX_C)), draw(st.integers(2, MAX_C)), draw(flag), draw(flag))
    if kind == "res":
        return ("res", c, draw(st.sampled_from([3, 1])), draw(flag), draw(flag))
    if kind == "cat":
        c1 = draw(st.integers(1, MAX_C - 1))
        return ("cat", c, c1, draw(st.integers(max(1, 2 - c1), MAX_C - c1)), draw(flag))
    if kind == "nested":
        c1 = draw(st.integers(1, 6))
        c2 = draw(st.integers(1, 6))
        identity = c1 + c2 + c <= MAX_C and draw(flag)
        return ("nested", c, c1, c2, 0 if identity else draw(st.integers(1, MAX_C - c1 - c2)))
    if kind == "split" and rep and c // rep >= 2:
        # cuts fall between repeated channels, never inside one (test_split_through_a_repeated_channel_...)
        how = draw(st.sampled_from(["split", "chunk", "getitem"]))
        chunks, units = 0, c // rep
        if how == "chunk":
            chunks = draw(st.integers(2, min(3, c)))
            sizes = _chunk_sizes(c, chunks)
            if any(s % rep for s in sizes):
                how, chunks = "split", 0
        if how != "chunk":
            first = draw(st.integers(1, units - 1))
            sizes = (first, units - first)
            if units - first >= 2 and draw(flag):
                second = draw(st.integers(1, units - first - 1))
                sizes = (first, second, units - first - second)
            sizes = tuple(rep * s for s in sizes)
        outs = tuple(draw(st.integers(0, 4)) for _ in sizes)  # 0: the piece passes through unchanged
        if sum(o or s for s, o in zip(sizes, outs)) > MAX_C:
            outs = tuple(o or 1 for o in outs)
        return ("split", how, sizes, outs, chunks)
    if kind == "dw":
        mult = draw(st.sampled_from([1, 2])) if 2 * c <= MAX_C else 1
        return ("dw", c, mult, draw(flag), draw(flag))
    if kind == "grouped" and c % 2 == 0 and c > 2:  # groups=2 on 2 channels would be depthwise
        return ("grouped", c, 2 * draw(st.integers(1, MAX_C // 2)))
    if kind == "se":
        return ("se", c, draw(st.integers(1, max(1, c // 2))))
    if kind == "pool" and size >= 2:
        return ("pool", draw(st.sampled_from(["max", "avg"])))
    return ("conv", c, draw(st.integers(2, MAX_C)), draw(st.sampled_from([3, 1])), draw(flag), draw(flag))


@st.composite
def plans(draw: st.DrawFn, max_blocks: int = 6) -> Plan:
    dims = draw(st.sampled_from([2, 2, 2, 1]))
    c0 = draw(st.integers(2, 12))
    size = draw(st.integers(4, 8) if dims == 2 else st.integers(4, 16))
    c, s, rep = c0, size, 1
    blocks = []
    for _ in range(draw(st.integers(0, max_blocks))):
        block = draw(_block(c, s, rep))
        blocks.append(block)
        c, s = _after(block, c, s)
        rep = _rep_after(block, rep)
    head = (draw(st.sampled_from(["flatten", "mean"])), draw(st.sampled_from(["torch.flatten", "view", "method"])),
            draw(st.sampled_from([0, 0, 5])))
    return Plan(dims, c0, size, tuple(blocks), head)


def build(plan: Plan) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Net(plan).eval()
        x = torch.randn(BATCH, plan.channels, *([plan.size] * plan.dims))
    return model, x


# --------------------------------------------------------------------------------------------------
# the invariants
# --------------------------------------------------------------------------------------------------
def _pairs(layout: Any, info: Any, where: str) -> Iterator[tuple[ChannelLayout, TensorInfo]]:
    """(layout, tensor info) of every tensor of a node's value (tuple-valued nodes have tuple layouts)."""
    if isinstance(layout, ChannelLayout):
        assert isinstance(info, TensorInfo), f"{where}: layout {layout} on a non-tensor value {info}"
        yield layout, info
    elif isinstance(layout, tuple):
        assert isinstance(info, tuple) and len(info) == len(layout), f"{where}: layout {layout} vs value {info}"
        for i, (lay, inf) in enumerate(zip(layout, info)):
            yield from _pairs(lay, inf, f"{where}[{i}]")
    else:
        assert layout is None, f"{where}: unexpected layout {layout!r}"


def _width(layout: ChannelLayout) -> int:
    return sum((s.stop - s.start) * s.block for s in layout.slices)


def _key(layout: ChannelLayout) -> tuple[Any, ...]:
    return tuple((s.group, s.start, s.stop, s.block) for s in layout.slices)


def _layouts(gm: GraphModule) -> dict[str, Any]:
    return {n.name: channel_layout(n) for n in gm.graph.nodes}


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_grouped(m: nn.Module | None) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups != m.in_channels


ALLOWED_REASONS = ("model input", "model output", "grouped convolution")
# A depthwise conv with a channel multiplier repeats each channel (block 2). duccio-fx cannot match such a
# layout against a plain tensor (a residual add or squeeze-excite multiply after it): it freezes those
# channels instead, which is conservative and allowed only in plans that have a multiplier.
REPEAT_REASONS = ("lay their channels out differently",)
# a LayerNorm over the channels (the channels-last MLP block) keeps the channels it normalises
ANYWHERE_REASONS = ("grouped convolution", "normalises over the channels")


def has_repeats(plan: Plan) -> bool:
    return any(b[0] == "dw" and b[2] > 1 for b in plan.blocks)


def check_structure(model: nn.Module, gm: GraphModule, groups: list[ChannelGroup], repeats: bool = False) -> None:
    by_id = {g.id: g for g in groups}
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(model.named_modules())

    # 8 (first half): ids are 0..n-1, in order
    assert [g.id for g in groups] == list(range(len(groups)))

    for node in gm.graph.nodes:
        # 2, 3: every layout is as wide as its tensor, every slice lies inside its group
        for lay, info in _pairs(channel_layout(node), tensor_info(node), node.name):
            assert 0 <= lay.dim < len(info.shape), f"{node.name}: {lay} on {info}"
            assert _width(lay) == info.shape[lay.dim], f"{node.name}: layout {lay} is not as wide as {info}"
            for s in lay.slices:
                assert s.group in by_id, f"{node.name}: {lay} names an unknown group"
                assert 0 <= s.start < s.stop <= by_id[s.group].channels, \
                    f"{node.name}: {s} outside g{s.group} ({by_id[s.group].channels} channels)"
                assert s.block >= 1
        role = op_role(node)
        assert role is not None and role.role != "unknown", f"{node.name} has role {role}"
        assert role.role != "blocks" or repeats, f"{node.name} blocks the channel search"

        # 4: add / mul of two full-width operands: same channels, or frozen
        if node.op == "call_function" and node.target in (operator.add, operator.mul):
            operands = [a for a in node.args if isinstance(a, Node)]
            out = tensor_info(node)
            if len(operands) == 2 and isinstance(out, TensorInfo):
                lays = [channel_layout(a) for a in operands]
                infos = [tensor_info(a) for a in operands]
                if all(isinstance(lay, ChannelLayout) for lay in lays):
                    dims = [lay.dim + len(out.shape) - len(info.shape) for lay, info in zip(lays, infos)]
                    full = all(_width(lay) == out.shape[d] > 1 for lay, d in zip(lays, dims))
                    involved = {s.group for lay in lays for s in lay.slices}
                    if full and not all(by_id[g].frozen for g in involved):
                        assert dims[0] == dims[1] and _key(lays[0]) == _key(lays[1]), \
                            f"{node.name} combines {lays[0]} with {lays[1]}"
                        out_lay = channel_layout(node)
                        assert isinstance(out_lay, ChannelLayout) and _key(out_lay) == _key(lays[0]), \
                            f"{node.name}: output {out_lay} vs operands {lays[0]}"

        # 5: cat on the channel dim lays the inputs' slices one after another
        if node.op == "call_function" and node.target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            out_lay = channel_layout(node)
            if dim == 1:
                assert isinstance(out_lay, ChannelLayout) and out_lay.dim == 1, f"{node.name}: {out_lay}"
                ins = [channel_layout(a) for a in node.args[0]]
                assert all(isinstance(lay, ChannelLayout) and lay.dim == 1 for lay in ins), f"{node.name}: {ins}"
                assert _key(out_lay) == sum((_key(lay) for lay in ins), ()), f"{node.name}: {out_lay} vs {ins}"

        # 7: inputs, outputs and both sides of a grouped conv are frozen, and say why
        if node.op == "placeholder":
            for lay, _ in _pairs(channel_layout(node), tensor_info(node), node.name):
                for g in lay.groups:
                    assert by_id[g].frozen and "model input" in by_id[g].reason, by_id[g]
        if node.op == "output":
            for arg in node.args:
                lay = channel_layout(arg)
                assert isinstance(lay, ChannelLayout), f"output {arg.name} has no layout"
                for g in lay.groups:
                    assert by_id[g].frozen and "model output" in by_id[g].reason, by_id[g]
        if _is_grouped(_module(gm, node)):
            for lay in (channel_layout(node.args[0]), channel_layout(node)):
                assert isinstance(lay, ChannelLayout)
                for g in lay.groups:
                    assert by_id[g].frozen and "grouped convolution" in by_id[g].reason \
                        and f"'{node.target}'" in by_id[g].reason, by_id[g]

    # 3 (cont.): every group describes some tensor; a group no layout mentions is a leftover
    used = {s.group for n in gm.graph.nodes for lay, _ in _pairs(channel_layout(n), tensor_info(n), n.name)
            for s in lay.slices}
    assert used == set(by_id), f"groups no node's layout mentions: {sorted(set(by_id) - used)}"

    for g in groups:
        # 6: members are whole groups of real nodes; searchable groups are produced by convs / linears
        assert g.channels >= 1 and g.members, g
        assert set(g.producers) == {m.owner for m in g.members}, g
        for m in g.members:
            assert m.stop - m.start == g.channels, g
            assert m.node in nodes, f"member {m} of g{g.id} is not a graph node"
            assert 0 <= m.start and m.stop <= _producer_width(nodes[m.node]), f"member {m} of g{g.id}"
        if g.frozen:
            # every generated model is traceable and registered: nothing but these may freeze a group
            for why in g.reason.split("; "):
                assert why.startswith(ALLOWED_REASONS) or any(r in why for r in ANYWHERE_REASONS) \
                    or (repeats and any(r in why for r in REPEAT_REASONS)), f"g{g.id} frozen: {why}"
        else:
            for p in g.producers:
                assert p in modules, f"g{g.id}: producer {p!r} is not a module"
                mod = modules[p]
                assert isinstance(mod, nn.Linear) or (isinstance(mod, nn.modules.conv._ConvNd)
                                                      and mod.groups == 1), f"g{g.id}: producer {p} is {mod}"
            for m in g.members:
                assert nodes[m.node].op == "call_module" and nodes[m.node].target == m.owner, m


def _producer_width(node: Node) -> int:
    lay = channel_layout(node)
    assert isinstance(lay, ChannelLayout), f"producer {node.name} has layout {lay}"
    return _width(lay)


# -- 9: the semantic check -------------------------------------------------------------------------
SKIP_ZERO_CHECK = (torch.sigmoid,)  # maps 0 → 0.5; checked through the multiply it feeds


def _indices(layout: ChannelLayout, group: int, channel: int) -> list[int]:
    """Entries along `layout.dim` that hold channel `channel` of group `group`."""
    found, pos = [], 0
    for s in layout.slices:
        if s.group == group and s.start <= channel < s.stop:
            first = pos + (channel - s.start) * s.block
            found.extend(range(first, first + s.block))
        pos += (s.stop - s.start) * s.block
    return found


class _ZeroChannel(Interpreter):
    """Runs the graph with channel `channel` of group `group` zeroed at each producer, and checks that every
    tensor entry mapped to (group, channel) is zero."""

    def __init__(self, gm: GraphModule, group: ChannelGroup, channel: int) -> None:
        super().__init__(gm)
        self.group, self.channel = group, channel
        self.zero: dict[str, list[int]] = {}
        for m in group.members:
            self.zero.setdefault(m.node, []).append(m.start + channel)
        self.checked = 0

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n.name in self.zero:
            lay = channel_layout(n)
            out = out.clone()
            out.index_fill_(lay.dim, torch.tensor(self.zero[n.name]), 0.0)
        elif not (n.op == "call_function" and n.target in SKIP_ZERO_CHECK) and n.op != "get_attr":
            # (a get_attr's layout says which entries of a per-channel parameter each channel owns)
            self._check(n, channel_layout(n), out)
        return out

    def _check(self, n: Node, layout: Any, value: Any) -> None:
        if isinstance(layout, tuple):
            for lay, v in zip(layout, value):
                self._check(n, lay, v)
        elif isinstance(layout, ChannelLayout):
            idx = _indices(layout, self.group.id, self.channel)
            if idx:
                self.checked += 1
                picked = value.index_select(layout.dim, torch.tensor(idx))
                assert torch.count_nonzero(picked) == 0, (
                    f"channel {self.channel} of g{self.group.id} (producers {self.group.producers}) was zeroed "
                    f"at every producer, but node {n.name} (layout {layout}) is non-zero at entries {idx}")


def check_zeroing(gm: GraphModule, x: torch.Tensor, group: ChannelGroup, channel: int) -> int:
    runner = _ZeroChannel(gm, group, channel)
    with torch.no_grad():
        runner.run(x)
    return runner.checked


def check_all(plan: Plan, channel_of: Any) -> dict[str, int]:
    model, x = build(plan)
    gm = duccio_fx.analyze(model, x)  # 1: never raises
    groups = duccio_fx.channel_groups(gm)
    check_structure(model, gm, groups, has_repeats(plan))

    # 8: deterministic — the same model analysed again gives the same groups, members and layouts
    again = duccio_fx.analyze(model, x)
    groups2 = duccio_fx.channel_groups(again)
    assert groups2 == groups
    assert [g.members for g in groups2] == [g.members for g in groups]
    assert _layouts(again) == _layouts(gm)

    stats = {"searchable": 0, "checked": 0}
    for g in groups:
        if not g.frozen:
            stats["searchable"] += 1
            stats["checked"] += check_zeroing(gm, x, g, channel_of(g))
    return stats


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=250, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans(), data=st.data())
def test_random_cnns_keep_the_channel_invariants(plan: Plan, data: st.DataObject) -> None:
    check_all(plan, lambda g: data.draw(st.integers(0, g.channels - 1), label=f"channel of g{g.id}"))


EVERY_BLOCK = Plan(2, 3, 8, (
    ("conv", 3, 8, 3, True, True),
    ("res", 8, 3, True, True),
    ("split", "split", (3, 5), (4, 0), 0),           # → 4 + 5
    ("res", 9, 1, False, False),
    ("cat", 9, 4, 6, True),
    ("nested", 10, 2, 3, 0),                          # identity branch → 2 + 3 + 10
    ("se", 15, 4),
    ("dw", 15, 1, True, True),
    ("split", "chunk", (5, 5, 5), (0, 3, 0), 3),
    ("split", "getitem", (6, 7), (2, 0), 0),
    ("pool", "max"),
    ("dw", 9, 1, False, False),
    ("conv", 9, 8, 1, False, True),
    ("mlp", 8, 12, 8, False, True),                   # channels last, layer scale, residual
    ("mlp", 8, 10, 8, True, False),                   # with a LayerNorm over the channels
    ("grouped", 8, 6),
), ("flatten", "view", 5))


def test_a_plan_with_every_block_is_searchable_and_the_zero_check_sees_it():
    """Guards the property test against vacuity: a rich model has searchable groups the check really visits."""
    stats = check_all(EVERY_BLOCK, lambda g: g.channels - 1)
    assert stats["searchable"] >= 8 and stats["checked"] >= 3 * stats["searchable"], stats
    for kind in ("chunk", "getitem"):
        assert any(b[0] == "split" and b[1] == kind for b in EVERY_BLOCK.blocks)


def test_conv1d_plan():
    plan = Plan(1, 4, 12, (("conv", 4, 8, 3, True, True), ("res", 8, 3, True, False), ("se", 8, 2),
                           ("cat", 8, 3, 5, False), ("pool", "avg"), ("dw", 8, 2, True, False)),
                ("mean", "method", 0))
    stats = check_all(plan, lambda g: 0)
    assert stats["searchable"] >= 3 and stats["checked"] > 0, stats


class _SplitThroughRepeat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 2, 3, padding=1)
        self.dw = nn.Conv2d(2, 4, 3, padding=1, groups=2)  # channel multiplier 2: layout g[0:2]x2
        self.head = nn.Conv2d(4, 5, 1)

    def forward(self, x):
        a, b = torch.split(self.dw(self.stem(x)), [1, 3], dim=1)  # the cut falls inside stem channel 0's block
        return self.head(torch.cat([a, b], 1))


def test_split_through_a_repeated_channel_blocks_cleanly():
    """Found by the property test: a split that cuts through a repeated channel must block once, with a
    clear reason, and leave no frozen group behind that no layout mentions."""
    model = _SplitThroughRepeat().eval()
    gm = duccio_fx.analyze(model, torch.randn(1, 3, 4, 4))
    groups = duccio_fx.channel_groups(gm)
    stem = next(g for g in groups if "stem" in g.producers)
    assert stem.frozen and "splits through the middle of a flattened or repeated channel" in stem.reason
    assert not any("does not match its output shape" in g.reason for g in groups)
    used = {s.group for n in gm.graph.nodes for lay, _ in _pairs(channel_layout(n), tensor_info(n), n.name)
            for s in lay.slices}
    assert used == {g.id for g in groups}, "frozen groups that no layout mentions were left behind"
