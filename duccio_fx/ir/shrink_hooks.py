"""How each op is rewritten when channels are removed: the "shrink" hooks of the op registry.

A hook gets a `ShrinkContext` (which entries of a value's channel dim survive) and the node, and rewrites
the node or its module in place: convs, linears and per-channel modules keep only the surviving weights,
biases, statistics and affine parameters (sliced, never re-initialised); ops that name channel counts
(split sizes, narrow, slicing, view shapes) get the new counts. The table in `builtin_rules` attaches them
to the ops; the shrink-export pass calls them, so no pass holds an if-ladder on op names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import ChannelSpec
from duccio_fx.ir.module_tree import set_module


class ShrinkContext(Protocol):
    """What a shrink hook may ask while the export runs."""

    gm: GraphModule

    def channels(self, value: Any) -> tuple[int, ChannelSpec, int] | None:
        """(channel dim, spec, ndim) of a tensor value whose channels shrink; None when none is removed."""

    def kept(self, spec: ChannelSpec) -> torch.Tensor:
        """Indices along the channel dim that survive."""

    def spec_of(self, value: Any) -> Any:
        """The channel spec(s) of a value: a spec, a tuple of them (tuple values), or None."""


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def shrink_module(module: nn.Module, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> nn.Module:
    """A copy of `module` keeping input entries `in_idx` and output entries `out_idx` (None: keep all)."""
    new = copy.deepcopy(module)
    if isinstance(new, nn.modules.conv._ConvNd):
        depthwise = new.groups > 1 and new.groups == new.in_channels
        if depthwise:
            keep = out_idx if out_idx is not None else torch.arange(new.out_channels)
            new.weight = _param(new.weight[keep])
            groups = len(in_idx) if in_idx is not None else new.in_channels
            new.in_channels, new.out_channels, new.groups = groups, len(keep), groups
        else:
            w = new.weight
            if out_idx is not None:
                w = w[out_idx]
                new.out_channels = len(out_idx)
            if in_idx is not None:
                w = w[:, in_idx]
                new.in_channels = len(in_idx)
            new.weight = _param(w)
            keep = out_idx
        if new.bias is not None and keep is not None:
            new.bias = _param(new.bias[keep])
        return new
    if isinstance(new, nn.Linear):
        w = new.weight
        if out_idx is not None:
            w = w[out_idx]
            new.out_features = len(out_idx)
            if new.bias is not None:
                new.bias = _param(new.bias[out_idx])
        if in_idx is not None:
            w = w[:, in_idx]
            new.in_features = len(in_idx)
        new.weight = _param(w)
        return new
    if in_idx is not None:  # per-channel modules: BatchNorm, InstanceNorm(affine), PReLU, user modules
        for name, p in list(new.named_parameters(recurse=False)):
            if p.numel() > 1:
                setattr(new, name, _param(p[in_idx]))
        for name, b in list(new.named_buffers(recurse=False)):
            if b is not None and b.numel() > 1:
                setattr(new, name, b[in_idx].clone())
        for attr in ("num_features", "num_parameters"):
            if hasattr(new, attr) and getattr(new, attr) > 1:
                setattr(new, attr, len(in_idx))
        if isinstance(new, nn.GroupNorm):  # one group per channel (other GroupNorms are frozen)
            new.num_channels = new.num_groups = len(in_idx)
    return new


def keep_as_is(ctx: ShrinkContext, node: Node) -> None:
    """Modules whose parameters do not index the channels (LayerNorm over time or width): nothing to cut."""


def shrink_attribute(ctx: ShrinkContext, node: Node) -> None:
    """A per-channel parameter or buffer read by `get_attr` (a layer scale): keep its surviving entries."""
    found = ctx.channels(node)
    if found is None:
        return
    dim, spec, _ = found
    parent, _, leaf = str(node.target).rpartition(".")
    owner = ctx.gm.get_submodule(parent) if parent else ctx.gm
    tensor = getattr(owner, leaf)
    kept = tensor.index_select(dim, ctx.kept(spec).to(tensor.device))
    setattr(owner, leaf, _param(kept) if isinstance(tensor, nn.Parameter) else kept.clone())


def shrink_layer(ctx: ShrinkContext, node: Node) -> None:
    """Conv / linear / per-channel module: keep the surviving input and output entries of its weights."""
    module = ctx.gm.get_submodule(str(node.target))
    if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.in_channels:
        return  # grouped convolutions are frozen
    ins, outs = ctx.channels(node.args[0] if node.args else None), ctx.channels(node)
    if ins is None and outs is None:
        return
    set_module(ctx.gm, str(node.target), shrink_module(module, ctx.kept(ins[1]) if ins else None,
                                                       ctx.kept(outs[1]) if outs else None))


@dataclass(frozen=True)
class _Source:
    """The shrinking input of a slicing op: its channel dim, spec, rank, and a counter of survivors."""

    dim: int
    spec: ChannelSpec
    ndim: int
    kept: torch.Tensor

    def count(self, stop: int) -> int:
        """Surviving entries before `stop`."""
        return int(torch.searchsorted(self.kept, torch.tensor(stop)).item())


def _source(ctx: ShrinkContext, node: Node) -> _Source | None:
    found = ctx.channels(node.args[0])
    return None if found is None else _Source(*found, ctx.kept(found[1]))


def _width(spec: ChannelSpec) -> int:
    return sum((stop - start) * block for _, start, stop, block in spec)


def shrink_getitem(ctx: ShrinkContext, node: Node) -> None:
    """`x[..., a:b, ...]` on the channel dim → the bounds among the surviving entries."""
    src = _source(ctx, node)
    if src is None:
        return
    idx = node.args[1]
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    pos, out = 0, []
    for item in items:
        if item is Ellipsis:
            pos += src.ndim - consumed
        elif item is not None:
            if pos == src.dim and isinstance(item, slice):
                start, stop, _ = item.indices(_width(src.spec))
                item = slice(src.count(start), src.count(stop), None)
            pos += 1
        out.append(item)
    node.args = (node.args[0], tuple(out) if isinstance(idx, tuple) else out[0])


def shrink_split(ctx: ShrinkContext, node: Node) -> None:
    """split / chunk / tensor_split on the channel dim → `split` with the surviving piece sizes."""
    src = _source(ctx, node)
    given = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    pieces = ctx.spec_of(node)
    if src is not None and given % src.ndim == src.dim and isinstance(pieces, tuple):
        widths = [_width(p) for p in pieces]
        bounds = [sum(widths[:k]) for k in range(len(widths) + 1)]
        sizes = [src.count(b) - src.count(a) for a, b in zip(bounds, bounds[1:])]
        node.target = "split" if node.op == "call_method" else torch.split
        node.args, node.kwargs = (node.args[0], sizes, src.dim), {}


def shrink_narrow(ctx: ShrinkContext, node: Node) -> None:
    """narrow on the channel dim → start and length among the surviving entries."""
    src = _source(ctx, node)
    given = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if src is not None and given % src.ndim == src.dim:
        start, length = node.args[2], node.args[3]
        node.args = (node.args[0], node.args[1], src.count(start), src.count(start + length) - src.count(start))


def shrink_shape(ctx: ShrinkContext, node: Node) -> None:
    """view / reshape / expand with a literal channel count → the surviving count."""
    src = node.args[0]
    out = ctx.channels(node)
    if ctx.channels(src) is None or out is None:
        return
    shape_args = list(node.args[1:])
    packed = len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list))
    shape = list(shape_args[0]) if packed else shape_args
    if out[0] < len(shape) and isinstance(shape[out[0]], int) and shape[out[0]] != -1:
        shape[out[0]] = len(ctx.kept(out[1]))
        node.args = (src, tuple(shape)) if packed else (src, *shape)
