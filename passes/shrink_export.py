"""shrink-export: lower a searchable graph to a plain, physically smaller model.

Every conv / linear / batch norm is replaced by an ordinary torch module holding only the kept channels
(weights, biases, BN running statistics and affine parameters sliced, never re-initialised); ops that
name channel counts (split sizes, narrow, slicing, view shapes, chunk) are rewritten for the new widths;
the mask bank and mask nodes disappear. Exact by construction (see `duccio_fx.masks`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.masks import PLAIN, MaskSpec, kept_entries
from duccio_fx.pass_manager import Pass

NodeLayout = Any  # (dim, MaskSpec, ndim) for a tensor | tuple[NodeLayout, ...] | None


def _searchable(spec: MaskSpec) -> bool:
    return any(index >= 0 for index, *_ in spec)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=True)


def shrink_module(module: nn.Module, in_idx: torch.Tensor | None, out_idx: torch.Tensor | None) -> nn.Module:
    """A copy of `module` keeping input entries `in_idx` and output entries `out_idx` (None: keep all)."""
    new = copy.deepcopy(module)
    if type(new) in PLAIN:
        new.__class__ = PLAIN[type(new)]
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
    if in_idx is not None:  # per-channel modules: BatchNorm, InstanceNorm(affine), PReLU
        for name, p in list(new.named_parameters(recurse=False)):
            if p.numel() > 1:
                setattr(new, name, _param(p[in_idx]))
        for name, b in list(new.named_buffers(recurse=False)):
            if b is not None and b.numel() > 1:
                setattr(new, name, b[in_idx].clone())
        for attr in ("num_features", "num_parameters"):
            if hasattr(new, attr) and getattr(new, attr) > 1:
                setattr(new, attr, len(in_idx))
    return new


@dataclass
class ShrinkExport(Pass):
    """Needs the layouts recorded at mask insertion and boolean masks per bank index."""

    layouts: dict[str, NodeLayout]
    masks: Sequence[torch.Tensor]
    bank: str = "duccio_masks"
    select: str = "duccio_mask_select"
    name = "shrink-export"
    _idx_cache: dict[MaskSpec, torch.Tensor] = field(default_factory=dict)

    def kept(self, spec: MaskSpec) -> torch.Tensor:
        if spec not in self._idx_cache:
            self._idx_cache[spec] = kept_entries(spec, self.masks)
        return self._idx_cache[spec]

    def layout(self, value: Any) -> NodeLayout:
        return self.layouts.get(value.name) if isinstance(value, Node) else None

    def run(self, gm: GraphModule) -> bool:
        dead = []
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and (node.target == self.bank or node.target.startswith(self.select + ".")):
                dead.append(node)
            elif node.op == "call_module":
                self._shrink_call(gm, node)
            elif node.op in ("call_function", "call_method"):
                self._rewrite_counts(gm, node)
        for node in reversed(dead):
            gm.graph.erase_node(node)
        for container in (self.bank, self.select):
            if hasattr(gm, container):
                delattr(gm, container)
        return True

    # -- modules -----------------------------------------------------------------------------------
    def _tensor(self, value: Any) -> tuple[int, MaskSpec, int] | None:
        lay = self.layout(value)
        return lay if isinstance(lay, tuple) and len(lay) == 3 and isinstance(lay[0], int) else None

    def _indices(self, value: Any) -> tuple[int, torch.Tensor] | None:
        """(channel dim, kept entries) of a tensor whose channels include searchable groups."""
        lay = self._tensor(value)
        return (lay[0], self.kept(lay[1])) if lay is not None and _searchable(lay[1]) else None

    def _shrink_call(self, gm: GraphModule, node: Node) -> None:
        module = gm.get_submodule(str(node.target))
        src = node.args[0] if node.args else None
        if type(module) in PLAIN:
            node.args = (src,) + tuple(node.args[2:])
        ins, outs = self._indices(src), self._indices(node)
        if ins is None and outs is None and type(module) not in PLAIN:
            return
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.in_channels:
            return  # grouped convolutions are frozen
        _set(gm, str(node.target), shrink_module(module, ins[1] if ins else None, outs[1] if outs else None))

    # -- ops that name channel counts ----------------------------------------------------------------
    def _rewrite_counts(self, gm: GraphModule, node: Node) -> None:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        src = node.args[0] if node.args else None
        lay = self._tensor(src)
        if lay is None or not _searchable(lay[1]):
            return
        dim, spec, ndim = lay
        kept = self.kept(spec)

        def count(stop: int) -> int:  # kept entries before `stop`
            return int(torch.searchsorted(kept, torch.tensor(stop)).item())

        if name == "getitem":
            node.args = (src, _rewrite_index(node.args[1], dim, ndim, _width(spec), count))
        elif name in ("split", "chunk", "tensor_split"):
            given = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            pieces = self.layout(node)
            if given % ndim == dim and isinstance(pieces, tuple):
                widths = [_width(p[1]) for p in pieces]
                bounds = [sum(widths[:k]) for k in range(len(widths) + 1)]
                sizes = [count(b) - count(a) for a, b in zip(bounds, bounds[1:])]
                node.target = "split" if node.op == "call_method" else torch.split
                node.args, node.kwargs = (src, sizes, dim), {}
        elif name == "narrow":
            given = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if given % ndim == dim:
                start, length = node.args[2], node.args[3]
                node.args = (src, node.args[1], count(start), count(start + length) - count(start))
        elif name in ("view", "reshape", "expand"):
            out = self._tensor(node)
            if out is None:
                return
            shape_args = list(node.args[1:])
            packed = len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list))
            shape = list(shape_args[0]) if packed else shape_args
            if out[0] < len(shape) and isinstance(shape[out[0]], int) and shape[out[0]] != -1:
                shape[out[0]] = len(self.kept(out[1]))
                node.args = (src, tuple(shape)) if packed else (src, *shape)


def _width(spec: MaskSpec) -> int:
    return sum((stop - start) * block for _, start, stop, block in spec)


def _rewrite_index(idx: Any, dim: int, ndim: int, width: int, count: Any) -> Any:
    """`x[..., a:b, ...]` on the channel dim → the bounds among the kept entries."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    pos, out = 0, []
    for item in items:
        if item is Ellipsis:
            pos += ndim - consumed
        elif item is not None:
            if pos == dim and isinstance(item, slice):
                start, stop, _ = item.indices(width)
                item = slice(count(start), count(stop), None)
            pos += 1
        out.append(item)
    return tuple(out) if isinstance(idx, tuple) else out[0]


def _set(gm: GraphModule, qualname: str, module: nn.Module) -> None:
    parent, _, leaf = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)

