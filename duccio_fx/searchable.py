"""The searchable model of the mask-based DNAS: masks, differentiable costs and the shrinking export.

    sm = duccio_fx.make_searchable(model, example_input)       # method="mask"
    loss = task_loss + lam * torch.relu(sm.costs()["params"] - target)
    small = sm.export()                                          # plain nn.Module, fewer channels

Everything the export needs is stored as plain data on the module, so a `torch.save`d search (or its
`state_dict` loaded into a fresh `make_searchable` of the same seed) can be exported later.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.channels import ChannelGroup
from duccio_fx.cost_model import LayerTerm, LayerValues, evaluate, layer_terms, target_costs
from duccio_fx.errors import DuccioError
from duccio_fx.masks import mask_spec
from duccio_fx.meta import GROUPS_KEY, ChannelLayout, TensorInfo, channel_layout, tensor_info
from duccio_fx.pass_manager import PassManager
from duccio_fx.pipeline import analyze
from duccio_fx.tracer import LeafSpec

if TYPE_CHECKING:
    from duccio_fx.targets import Target


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
    def costs(self, target: Target | str | None = None) -> dict[str, Any]:
        """Costs of the binarized architecture, differentiable w.r.t. the α (straight-through).

        `params`: conv/linear weights + biases; `macs`: per sample; `layer_memory`: per layer,
        weights + input + output activation elements (= bytes at 8 bit). With a `target` (a Target, a
        name or a path) also `size_bytes`, `layer_bytes` (DORY's accounting), `layer_cycles`, `cycles`,
        `latency_s` and `overflow_bytes` (per layer-wise level; L2V on GAP8).
        """
        masks = tuple(m.double() for m in self._bank_masks())  # float64: MAC counts exceed 2**24
        values = evaluate(self.terms, masks)
        out: dict[str, Any] = {
            "params": torch.as_tensor(sum((v.params for v in values), 0), dtype=torch.float64),
            "macs": torch.as_tensor(sum((v.macs for v in values), 0), dtype=torch.float64),
            "layer_memory": {v.term.name: torch.as_tensor(v.elements, dtype=torch.float64) for v in values},
        }
        if target is not None:
            from duccio_fx.targets import load_target

            tc = target_costs(values, load_target(target))
            out.update({k: _tensors(x) for k, x in tc.items()})
        return out

    def cost_values(self, target: Target | str | None = None) -> dict[str, Any]:
        """`costs()` as plain floats (no graph), for logs and reports."""
        from duccio_fx.cost_model import as_float

        with torch.no_grad():
            return as_float(self.costs(target))

    def minimum_masks(self) -> tuple[torch.Tensor, ...]:
        """One channel per searchable group: the smallest architecture the search space holds."""
        return tuple(torch.nn.functional.one_hot(torch.tensor(0), g.channels).double() for g in self.channel_groups)

    def layer_values(self) -> list[LayerValues]:
        """Kept channels and counts of every conv/linear layer (tensors; for custom cost terms)."""
        return evaluate(self.terms, tuple(m.double() for m in self._bank_masks()))

    # -- export -------------------------------------------------------------------------------------
    def export(self) -> GraphModule:
        """A plain model of ordinary torch modules holding only the kept channels (eval-exact)."""
        from duccio_fx.passes.shrink_export import ShrinkExport

        masks = [m.detach() > 0.5 for m in self._bank_masks()]
        gm = copy.deepcopy(self.graph_module)
        PassManager([ShrinkExport(self.layouts, masks, self.bank_name)]).run(gm)
        gm.train(self.training)
        return gm


def _tensors(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tensors(v) for k, v in x.items()}
    return torch.as_tensor(x, dtype=torch.float64)


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
    terms = layer_terms(gm, bank_index)
    groups = gm.meta[GROUPS_KEY]
    for node in gm.graph.nodes:  # the graph is pickled without meta; everything needed is in `layouts`
        node.meta = {k: v for k, v in node.meta.items() if not k.startswith("duccio_")}
    return SearchableModel(gm, groups, insertion.excluded, layouts, terms, BANK)
