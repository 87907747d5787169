"""The mask-based search method (PIT-like DNAS): trainable channel masks, costs, the shrinking export.

    sm = duccio_fx.make_searchable(model, example_input)       # method="mask"
    loss = task_loss + lam * torch.relu(sm.costs()["params"] - target)
    small = sm.export()                                          # plain nn.Module, fewer channels

The IR keeps its typed annotations through mask insertion; they travel with the module through
`torch.save` (pickling a GraphModule drops `meta`, so the module gives them back when it is loaded), and a
`state_dict` loads into a fresh `make_searchable` of the same seed.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.model import Costs
from duccio_fx.costs.program import CostProgram
from duccio_fx.costs.terms import LayerValues, evaluate
from duccio_fx.ir.channels import ChannelGroup
from duccio_fx.ir.meta import GROUPS_KEY, LayerTerm, duccio_meta, layer_terms, restore_meta
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.ir.tracer import LeafSpec
from duccio_fx.passes.mask_insertion import BANK, MaskInsertion
from duccio_fx.passes.shrink_export import ShrinkExport
from duccio_fx.pipeline import analyze
from duccio_fx.search.space import SearchSpace, register_search_method
from duccio_fx.targets import Target, load_target


class SearchableModel(SearchSpace):
    """A model whose searchable channel groups carry trainable masks (mask-based DNAS)."""

    def __init__(self, graph_module: GraphModule, excluded: dict[int, str]) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.excluded = dict(excluded)
        self.terms: list[LayerTerm] = layer_terms(graph_module)
        groups: tuple[ChannelGroup, ...] = graph_module.meta[GROUPS_KEY]
        ids = self.bank.group_ids if self.bank is not None else []
        self.channel_groups: list[ChannelGroup] = [next(g for g in groups if g.id == i) for i in ids]
        self.all_groups = list(groups)
        self._meta = duccio_meta(graph_module)
        self._program: CostProgram | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        restore_meta(self.graph_module, self._meta)  # a loaded GraphModule has lost its annotations

    # -- the model -----------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    @property
    def bank(self) -> nn.Module | None:
        return getattr(self.graph_module, BANK, None)

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """The α vectors (train them without weight decay)."""
        return iter(self.bank.parameters()) if self.bank is not None else iter(())

    # -- masks --------------------------------------------------------------------------------------
    def _flat_masks(self) -> torch.Tensor:
        """The binarized masks of every searchable group as one flat vector (straight-through gradients)."""
        bank = self.bank
        return bank.masks() if bank is not None else torch.zeros(0)

    def masks(self) -> dict[int, torch.Tensor]:
        """Binarized mask of every searchable group, by group id (True = channel kept)."""
        if self.bank is None:
            return {}
        kept = self._flat_masks().detach() > 0.5
        return {g.id: m for g, m in zip(self.channel_groups, kept.split(self.bank.sizes))}

    def set_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """Set groups' masks (α = 1 where kept, 0 where removed; the largest-α channel always stays)."""
        ids = {g.id: i for i, g in enumerate(self.channel_groups)}
        for gid, mask in masks.items():
            if gid not in ids:
                raise DuccioError(f"channel group {gid} is not searchable", where="SearchableModel.set_masks",
                                  fix=f"use one of the ids of .channel_groups: {sorted(ids)}")
            alpha = self.bank.group_alpha(ids[gid])
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != alpha.shape:
                raise DuccioError(f"mask for group {gid} has shape {tuple(mask.shape)}, expected "
                                  f"{tuple(alpha.shape)}", where="SearchableModel.set_masks")
            with torch.no_grad():
                alpha.copy_(mask.to(alpha.dtype))

    # -- costs --------------------------------------------------------------------------------------
    def program(self) -> CostProgram:
        """The layer terms compiled against the searchable groups (built once)."""
        if getattr(self, "_program", None) is None:  # (a model pickled before programs existed has none)
            self._program = CostProgram(self.terms, [(g.id, g.channels) for g in self.channel_groups])
        return self._program

    def costs(self, target: Target | str | None = None) -> Costs:
        """Costs of the binarized architecture, differentiable w.r.t. the α (straight-through).

        `params`: conv/linear weights + biases; `macs`: per sample; `layer_memory`: per layer,
        weights + input + output activation elements (= bytes at 8 bit). With a `target` (a Target, a
        name or a path) also `size_bytes`, `layer_bytes` (DORY's accounting), `layer_cycles`, `cycles`,
        `latency_s` and `overflow_bytes` (per layer-wise level; L2V on GAP8). One vectorised evaluation
        over all layers (`CostProgram`): a fixed number of ops whatever the depth, and no host sync.
        """
        hw = load_target(target) if target is not None else None
        return self.program().costs(self._flat_masks(), hw)

    def minimum_masks(self) -> dict[int, torch.Tensor]:
        """One channel per searchable group: the smallest architecture the search space holds."""
        return {g.id: torch.nn.functional.one_hot(torch.tensor(0), g.channels).double() for g in self.channel_groups}

    def minimum_costs(self, target: Target | str | None = None) -> Costs:
        hw = load_target(target) if target is not None else None
        program = self.program()
        return program.costs(program.flatten(self.minimum_masks()), hw).floats()

    def structure(self) -> str:
        return self.graph_module.code + repr(self)

    @property
    def seed_terms(self) -> Sequence[LayerTerm]:
        return self.terms

    def layer_values(self) -> list[LayerValues]:
        """Kept channels and counts of every conv/linear layer, one by one (tensors; for custom cost terms
        and per-layer reports; the costs themselves are evaluated vectorised)."""
        masks = self._flat_masks().double()
        return evaluate(self.terms, {g.id: m for g, m in zip(self.channel_groups, masks.split(self.bank.sizes))}
                        if self.bank is not None else {})

    # -- export -------------------------------------------------------------------------------------
    def export(self, context: PassContext | None = None) -> GraphModule:
        """A plain model of ordinary torch modules holding only the kept channels (eval-exact)."""
        gm = copy.deepcopy(self.graph_module)
        (context or PassContext()).run(gm, [ShrinkExport(self.masks())])
        gm.train(self.training)
        return gm


@register_search_method("mask")
def make_mask_space(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                    context: PassContext | None = None, threshold: float = 0.5) -> SearchableModel:
    """Analyse a copy of `model` and insert one trainable mask per searchable channel group."""
    context = context or PassContext()
    gm = analyze(copy.deepcopy(model), example_inputs, leaf_modules, context=context)
    insertion = MaskInsertion(threshold=threshold)
    context.run(gm, [insertion])
    return SearchableModel(gm, insertion.excluded)
