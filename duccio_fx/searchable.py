"""The searchable model of the mask-based DNAS: masks, differentiable costs and the shrinking export.

    sm = duccio_fx.make_searchable(model, example_input)       # method="mask"
    loss = task_loss + lam * torch.relu(sm.costs()["params"] - target)
    small = sm.export()                                          # plain nn.Module, fewer channels

Everything the export needs is stored as plain data on the module, so a `torch.save`d search (or its
`state_dict` loaded into a fresh `make_searchable` of the same seed) can be exported later.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.channels import ChannelGroup
from duccio_fx.errors import DuccioError
from duccio_fx.masks import MaskSpec, mask_spec
from duccio_fx.meta import GROUPS_KEY, ChannelLayout, TensorInfo, channel_layout, op_role, tensor_info
from duccio_fx.pass_manager import PassManager
from duccio_fx.pipeline import analyze
from duccio_fx.tracer import LeafSpec


@dataclass(frozen=True)
class LayerTerm:
    """Cost of one conv/linear as a function of its kept input and output entries."""

    name: str
    kind: str  # "conv" | "depthwise" | "fixed" | "linear"
    in_spec: MaskSpec
    out_spec: MaskSpec
    kernel: int  # kernel elements (1 for linear)
    positions: int  # output positions per sample (linear: leading dims)
    in_positions: int  # input positions per sample
    bias: bool
    fixed_params: int  # for frozen (grouped) layers


def _count(spec: MaskSpec, masks: Sequence[torch.Tensor]) -> torch.Tensor | int:
    total: torch.Tensor | int = 0
    for index, start, stop, block in spec:
        total = total + ((stop - start) * block if index < 0 else masks[index][start:stop].sum() * block)
    return total


def _layer_terms(gm: GraphModule, bank_index: dict[int, int]) -> list[LayerTerm]:
    terms = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        src = node.args[0]
        in_lay, out_lay = channel_layout(src), channel_layout(node)
        in_info, out_info = tensor_info(src), tensor_info(node)
        assert isinstance(in_info, TensorInfo) and isinstance(out_info, TensorInfo)
        in_spec = mask_spec(in_lay, bank_index) if isinstance(in_lay, ChannelLayout) else ((-1, 0, 1, 1),)
        out_spec = mask_spec(out_lay, bank_index) if isinstance(out_lay, ChannelLayout) else ((-1, 0, 1, 1),)
        role = op_role(node).role if op_role(node) else "defines"
        weights = module.weight.numel()
        if isinstance(module, nn.Linear):
            kind, kernel = "linear", 1
            positions = math.prod(out_info.shape[1:-1])
            in_positions = math.prod(in_info.shape[1:-1])
        else:
            kernel = math.prod(module.kernel_size)
            positions = math.prod(out_info.shape[2:])
            in_positions = math.prod(in_info.shape[2:])
            kind = {"defines": "conv", "depthwise": "depthwise"}.get(role, "fixed")
            if module.transposed:
                positions = in_positions  # MACs of a transposed conv scale with its input
        fixed = weights + (module.bias.numel() if module.bias is not None else 0)
        terms.append(LayerTerm(str(node.target), kind, in_spec, out_spec, kernel, positions, in_positions,
                               module.bias is not None, fixed))
    return terms


class SearchableModel(nn.Module):
    """A model whose searchable channel groups carry trainable masks (mask-based DNAS)."""

    def __init__(self, graph_module: GraphModule, groups: Sequence[ChannelGroup], excluded: dict[int, str],
                 layouts: dict[str, Any], terms: Sequence[LayerTerm], bank: str) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.bank_name = bank
        self.excluded = dict(excluded)
        self.layouts = layouts
        self.terms = list(terms)
        bank_module = getattr(graph_module, bank, None)
        ids = bank_module.group_ids if bank_module is not None else []
        self.channel_groups: list[ChannelGroup] = [next(g for g in groups if g.id == i) for i in ids]
        self.all_groups = list(groups)

    # -- the model -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    @property
    def bank(self) -> nn.Module | None:
        return getattr(self.graph_module, self.bank_name, None)

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """The α vectors (train them without weight decay)."""
        return iter(self.bank.parameters()) if self.bank is not None else iter(())

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    # -- masks --------------------------------------------------------------------------------------
    def _bank_masks(self) -> tuple[torch.Tensor, ...]:
        return self.bank() if self.bank is not None else ()

    def masks(self) -> dict[int, torch.Tensor]:
        """Binarized mask of every searchable group, by group id (True = channel kept)."""
        return {g.id: m.detach() > 0.5 for g, m in zip(self.channel_groups, self._bank_masks())}

    def set_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """Set groups' masks (α = 1 where kept, 0 where removed; the largest-α channel always stays)."""
        ids = {g.id: i for i, g in enumerate(self.channel_groups)}
        for gid, mask in masks.items():
            if gid not in ids:
                raise DuccioError(f"channel group {gid} is not searchable", where="SearchableModel.set_masks",
                                  fix=f"use one of the ids of .channel_groups: {sorted(ids)}")
            alpha = self.bank.alphas[ids[gid]]
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != alpha.shape:
                raise DuccioError(f"mask for group {gid} has shape {tuple(mask.shape)}, expected "
                                  f"{tuple(alpha.shape)}", where="SearchableModel.set_masks")
            with torch.no_grad():
                alpha.copy_(mask.to(alpha.dtype))

    # -- costs --------------------------------------------------------------------------------------
    def costs(self) -> dict[str, Any]:
        """Costs of the binarized architecture, differentiable w.r.t. the α (straight-through).

        `params`: conv/linear weights + biases; `macs`: per sample; `layer_memory`: per layer,
        weights + input + output activation elements (= bytes at 8 bit).
        """
        masks = tuple(m.double() for m in self._bank_masks())  # float64: MAC counts exceed 2**24
        params: torch.Tensor | int = 0
        macs: torch.Tensor | int = 0
        memory: dict[str, torch.Tensor] = {}
        for t in self.terms:
            kin, kout = _count(t.in_spec, masks), _count(t.out_spec, masks)
            if t.kind == "conv" or t.kind == "linear":
                weights = kin * kout * t.kernel
                bias = kout if t.bias else 0
            elif t.kind == "depthwise":
                weights = kout * t.kernel
                bias = kout if t.bias else 0
            else:
                weights, bias = t.fixed_params - (kout if t.bias else 0), kout if t.bias else 0
            params = params + weights + bias
            macs = macs + weights * t.positions
            memory[t.name] = torch.as_tensor(weights + kin * t.in_positions + kout * t.positions,
                                             dtype=torch.float64)
        return {"params": torch.as_tensor(params, dtype=torch.float64),
                "macs": torch.as_tensor(macs, dtype=torch.float64), "layer_memory": memory}

    # -- export -------------------------------------------------------------------------------------
    def export(self) -> GraphModule:
        """A plain model of ordinary torch modules holding only the kept channels (eval-exact)."""
        from duccio_fx.passes.shrink_export import ShrinkExport

        masks = [m.detach() > 0.5 for m in self._bank_masks()]
        gm = copy.deepcopy(self.graph_module)
        PassManager([ShrinkExport(self.layouts, masks, self.bank_name)]).run(gm)
        gm.train(self.training)
        return gm


def _node_layouts(gm: GraphModule, bank_index: dict[int, int]) -> dict[str, Any]:
    def plain(layout: Any, info: Any) -> Any:
        if isinstance(layout, ChannelLayout) and isinstance(info, TensorInfo):
            return (layout.dim, mask_spec(layout, bank_index), len(info.shape))
        if isinstance(layout, tuple) and isinstance(info, tuple):
            return tuple(plain(lay, i) for lay, i in zip(layout, info))
        return None

    return {n.name: plain(channel_layout(n), tensor_info(n)) for n in gm.graph.nodes}


def make_searchable(model: nn.Module, example_inputs: Any, method: str = "mask", *, threshold: float = 0.5,
                    leaf_modules: Sequence[LeafSpec] = ()) -> SearchableModel:
    """Wrap a copy of `model` for the search (the user's model is left untouched)."""
    from duccio_fx.passes.mask_insertion import BANK, MaskInsertion

    if method != "mask":
        raise DuccioError(f"unknown search method {method!r}", fix="use method='mask' (path-based search: coming)")
    gm = analyze(copy.deepcopy(model), example_inputs, leaf_modules)
    insertion = MaskInsertion(threshold=threshold)
    PassManager([insertion]).run(gm)
    bank = getattr(gm, BANK, None)
    ids = bank.group_ids if bank is not None else []
    bank_index = {gid: i for i, gid in enumerate(ids)}
    layouts = _node_layouts(gm, bank_index)
    terms = _layer_terms(gm, bank_index)
    groups = gm.meta[GROUPS_KEY]
    for node in gm.graph.nodes:  # the graph is pickled without meta; everything needed is in `layouts`
        node.meta = {k: v for k, v in node.meta.items() if not k.startswith("duccio_")}
    return SearchableModel(gm, groups, insertion.excluded, layouts, terms, BANK)
