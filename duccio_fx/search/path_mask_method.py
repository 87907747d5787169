"""The path+mask method: the path method's choice among alternatives, with channel masks inside the choice.

    sp = duccio_fx.make_searchable(model, example_input, method="path+mask")
    loss = task_loss + lam * torch.relu(sp.costs("gap8")["size_bytes"] - target)
    small = sp.export()      # the argmax alternative of every point, holding only its kept channels

The path method alone jumps between coarse points (a dwsep3 block is about 1/8 of a conv3 block), so its
results often sit far under their bound; masks let it spend the whole budget. The supernet is the path
method's (`supernet-insertion`), and every channel group of the seed gets the mask method's α, shared by
every alternative that reads or writes it: a choice point's block reads its input group (the masks of the
alternatives' first channel-mixing layer) and writes its output group (masked, as in the mask method, on the
input side of the layers that read it). Costs are Σ_i g_i · cost_i(masks) over every layer of every
alternative, plus the fixed layers at their masks: one vectorised cost program with one weight per layer.

An alternative whose output is its input (identity, or a depthwise-only block) is offered only where the
block's input and output are one channel group: otherwise its output would need channels the masks removed
(`dropped` says where). A point whose alternatives the masks cannot reach (a declared `Choice` that is not a
sequence of layers) keeps its input and output channels whole (`frozen` says which).

Its defaults were measured on the MNIST example at 50 % and 75 % size (benchmarks/README.md). `argmax_share`
stays 0: the path method's argmax steps cost path+mask 1.3 and 0.3 points there (0.962 and 0.970 with 0.5).
Two of them were chosen because the masks are shared by every alternative:
- `cost_mode="expected"`: with the sampled one-hot g, every step that draws a costly alternative (conv5 is
  2.8× conv3) pushes the shared masks of its groups far over the bound, so the masks of the argmax
  architecture ended at 81 % of a 75 % bound; with softmax(θ) the costs move smoothly and the result spends
  93 % of it.
- `seed_logit=2`: θ of each point's seed alternative starts the search at 2 (the others at 0), so the masks
  first shrink the seed's own blocks, as the mask method does, and an alternative wins only where it pays.
  From θ = 0 the search drifted to narrow conv5 blocks (1.2 points under the mask method at 50 %).

Building it is a pipeline: supernet-insertion (the path method's), choice-channels (the alternatives' layers
into the seed's groups), mask-insertion (the mask method's), choice-mask-insertion (each point gets its
input's mask). The export picks the argmax alternatives (`choice-export`), analyses the plain model again
and keeps the channels of each of its groups that the group of the search with the same producing layers
keeps (`shrink-export`): exact, and costs equal to those the search computed.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.model import Costs
from duccio_fx.costs.program import CostProgram
from duccio_fx.ir.channels import ChannelGroup
from duccio_fx.ir.meta import GROUPS_KEY, LayerTerm, channel_layout, choice_info, spec_of
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.ir.tracer import LeafSpec
from duccio_fx.passes.choice_channels import ChoiceChannels
from duccio_fx.passes.choice_export import ChoiceExport
from duccio_fx.passes.choice_mask_insertion import ChoiceMaskInsertion
from duccio_fx.passes.mask_insertion import BANK, MaskInsertion
from duccio_fx.passes.shrink_export import ShrinkExport, strip_masks
from duccio_fx.pipeline import analyze
from duccio_fx.search.masks import PLAIN, MaskBank
from duccio_fx.search.path_method import COST_MODES, PATH_DEFAULTS, PathSpace, build_supernet
from duccio_fx.search.space import register_search_method
from duccio_fx.targets import Target, load_target


class PathMaskSpace(PathSpace):
    """A supernet (`PathSpace`) whose channel groups carry masks (α) shared by all alternatives."""

    method = "path+mask"

    def __init__(self, graph_module: GraphModule, fixed: dict[str, str], seed_terms: Sequence[LayerTerm],
                 terms: dict[tuple[str, str], tuple[LayerTerm, ...]], example_inputs: tuple[Any, ...], *,
                 dropped: dict[str, dict[str, str]], frozen: dict[int, str], excluded: dict[int, str],
                 **path_options: Any) -> None:
        super().__init__(graph_module, fixed, seed_terms, dropped=dropped, **path_options)
        self.frozen_groups = dict(frozen)  # group id → why the masks leave it whole (besides the analysis' own)
        self.excluded = dict(excluded)  # mask-insertion's: group id → why not searched
        self.option_terms = terms  # (point, alternative) → its layers, in the seed's channel groups
        self.example = tuple(x[:1].detach().cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
        groups: tuple[ChannelGroup, ...] = graph_module.meta[GROUPS_KEY]
        ids = self.bank.group_ids if self.bank is not None else []
        self.channel_groups = [next(g for g in groups if g.id == i) for i in ids]
        self.all_groups = list(groups)
        self._program: CostProgram | None = None

    # -- parameters -----------------------------------------------------------------------------------
    @property
    def bank(self) -> MaskBank | None:
        return getattr(self.graph_module, BANK, None)

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """Every point's θ and the masks' α (trained in the search only, without weight decay)."""
        return iter([self.choice_bank.theta] + ([self.bank.alpha] if self.bank is not None else []))

    def _flat_masks(self) -> torch.Tensor:
        return self.bank.masks() if self.bank is not None else torch.zeros(0)

    def masks(self) -> dict[int, torch.Tensor]:
        """The binarized mask of every searched channel group, by group id (True = kept)."""
        if self.bank is None:
            return {}
        kept = self._flat_masks().detach() > 0.5
        return {g.id: m for g, m in zip(self.channel_groups, kept.split(self.bank.sizes))}

    def set_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """Set groups' masks (α = 1 where kept, 0 where removed; the first largest α always stays)."""
        index = {g.id: i for i, g in enumerate(self.channel_groups)}
        for gid, mask in masks.items():
            if gid not in index:
                raise DuccioError(f"channel group {gid} is not searchable", where="PathMaskSpace.set_masks",
                                  fix=f"use one of: {sorted(index)}")
            alpha = self.bank.group_alpha(index[gid])
            with torch.no_grad():
                alpha.copy_(torch.as_tensor(mask, dtype=alpha.dtype).reshape(alpha.shape))

    def architecture(self) -> dict[str, Any]:
        """Per point: its alternative, their probabilities and the output channels it keeps."""
        out = super().architecture()
        masks = self.masks()
        for info, node in zip(self.infos, self._point_nodes()):
            spec = spec_of(channel_layout(node), 0)
            out[info.point]["channels"] = sum((int(masks[g][lo:hi].sum()) if g in masks else hi - lo) * size
                                              for g, lo, hi, size in spec)
        return out

    def _point_nodes(self) -> list[Node]:
        return [n for n in self.graph_module.graph.nodes if choice_info(n) is not None]

    # -- costs ----------------------------------------------------------------------------------------
    def program(self) -> CostProgram:
        """Every fixed layer and every alternative's layers, in graph order, against the searched groups."""
        if self._program is None:
            rows: list[LayerTerm] = []
            owner: list[int] = []  # each row's alternative (flat index over every point's), -1: a fixed layer
            k = 0
            for x in self.layout:  # graph order, as the exported model lists its layers
                if isinstance(x, LayerTerm):
                    rows.append(x)
                    owner.append(-1)
                    continue
                for option in x.options:
                    option_terms = self.option_terms[(x.point, option.name)]
                    rows.extend(option_terms)
                    owner.extend([k] * len(option_terms))
                    k += 1
            self._program = CostProgram(rows, [(g.id, g.channels) for g in self.channel_groups])
            self._owner = torch.tensor([o if o >= 0 else k for o in owner], dtype=torch.long)
        return self._program

    def _layer_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Each row's weight: its alternative's entry of `weights`, 1 for a fixed layer."""
        self.program()
        w = torch.cat([weights.to(torch.float64), weights.new_ones(1, dtype=torch.float64)])
        owners = self.__dict__.setdefault("_owners", {})  # one copy per device, not one per step
        if w.device not in owners:
            owners[w.device] = self._owner.to(w.device)
        return w.index_select(0, owners[w.device])

    def costs(self, target: Target | str | None = None) -> Costs:
        """Fixed layers + Σ_points Σ_i g_i · cost_i(masks): the g of the last forward pass in training (the
        argmax in evaluation), the binarized masks (straight-through); differentiable w.r.t. θ and α."""
        hw = load_target(target) if target is not None else None
        return self.program().costs(self._flat_masks(), hw, layer_weights=self._layer_weights(self._weights()))

    def cost_values(self, target: Target | str | None = None) -> Costs:
        """Costs (floats) of what `export()` returns now: the argmax alternatives at their kept channels,
        summed over exactly the exported model's layers in its order (so the totals equal its costs to the
        last bit); per-layer tables name the layers of alternatives not chosen too, at 0."""
        hw = load_target(target) if target is not None else None
        program = self.program()
        chosen = self.choice_bank.argmax().to(self._owner.device)
        rows = torch.cat([chosen, chosen.new_ones(1)]).index_select(0, self._owner).nonzero().flatten().tolist()
        key = tuple(rows)
        programs = self.__dict__.setdefault("_chosen_programs", {})
        if key not in programs:
            programs[key] = (CostProgram([program.terms[r] for r in rows], program.groups), rows)
        part, _ = programs[key]
        with torch.no_grad():
            return self._with_unchosen(part.costs(self._flat_masks().detach(), hw).floats())

    def minimum_costs(self, target: Target | str | None = None) -> Costs:
        """Every group at one channel and every point at its cheapest alternative, metric by metric."""
        hw = load_target(target) if target is not None else None
        program = self.program()
        masks = program.flatten({g.id: torch.nn.functional.one_hot(torch.tensor(0), g.channels).double()
                                 for g in self.channel_groups})
        sizes = self.choice_bank.sizes
        options = sum(sizes)

        def part(k: int) -> Costs:  # option k's layers alone (k = options: the fixed layers)
            one = torch.zeros(options + 1, dtype=torch.float64)
            one[k] = 1.0
            with torch.no_grad():
                return program.costs(masks, hw, layer_weights=one.index_select(0, self._owner)).floats()

        fixed, parts = part(options), [part(k) for k in range(options)]
        totals = {}
        for field in ("params", "macs", "size_bytes", "cycles"):
            if getattr(fixed, field) is None:
                continue
            value, start = getattr(fixed, field), 0
            for n in sizes:
                value += min(getattr(p, field) for p in parts[start:start + n])
                start += n
            totals[field] = value
        if hw is not None:
            totals["latency_s"] = totals["cycles"] / hw.compute.clock
            levels = {}
            for level, base in (fixed.overflow_bytes or {}).items():
                start = 0
                for n in sizes:
                    base += min(p.overflow_bytes[level] for p in parts[start:start + n])
                    start += n
                levels[level] = base
            totals["overflow_bytes"] = levels
        return replace(fixed, **totals)

    def layer_candidates(self) -> Sequence[LayerTerm]:
        return list(self.program().terms)

    def structure(self) -> str:
        return super().structure() + repr(self.bank) + repr(sorted(self.frozen_groups)) + repr(
            {p: sorted(d) for p, d in self.dropped.items()})

    # -- export ---------------------------------------------------------------------------------------
    def export(self, context: PassContext | None = None) -> GraphModule:
        """A plain model: the argmax alternative of every point, holding only the kept channels (eval-exact)."""
        context = context or PassContext()
        gm = copy.deepcopy(self.graph_module)
        for node in gm.graph.nodes:  # the alternatives' masked layers become plain again
            if choice_info(node) is not None:
                for m in gm.get_submodule(str(node.target)).modules():
                    if type(m) in PLAIN:
                        m.__class__ = PLAIN[type(m)]
        strip_masks(gm)
        gm.recompile()
        context.run(gm, [ChoiceExport(self.choices())])
        gm.train(False)
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        plain = analyze(gm, tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in self.example),
                        context=context)
        masks = self._masks_for(plain)
        context.run(plain, [MaskInsertion(), ShrinkExport(masks)])
        plain.train(self.training)
        return plain

    def _masks_for(self, plain: GraphModule) -> dict[int, torch.Tensor]:
        """The search's masks, by the group ids of the plain model's analysis: a group takes the mask of the
        search's group that holds the same channels of the same layers' outputs (an alternative's layers stand
        for their point's seed conv, whose output channels the search's groups name)."""
        searched = self.masks()
        where: dict[tuple[str, int, int], int] = {}  # (layer, first, last channel) → the search's group
        for g in self.all_groups:
            for m in g.members:
                where[(m.owner, m.start, m.stop)] = g.id
        owner_of = {t.name: point for (point, _), option_terms in self.option_terms.items() for t in option_terms}
        out: dict[int, torch.Tensor] = {}
        for g in plain.meta[GROUPS_KEY]:
            hits = {where[key] for m in g.members
                    if (key := (owner_of.get(m.owner, m.owner), m.start, m.stop)) in where} & set(searched)
            if not hits:
                continue
            if len(hits) > 1 or searched[next(iter(hits))].numel() != g.channels:
                raise DuccioError(f"channel group {g.id} of the exported model ({', '.join(g.producers)}) matches "
                                  f"groups {sorted(hits)} of the search", where="path+mask export",
                                  fix="report this with the model (the export keeps the channels by group)")
            out[g.id] = searched[hits.pop()]
        return out


# "neighbours" needs costs linear in the choice weights alone; path+mask's also move with the masks
PATH_MASK_COST_MODES = tuple(m for m in COST_MODES if m != "neighbours")


@register_search_method("path+mask")
def make_path_mask_space(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                         context: PassContext | None = None, threshold: float = 0.5,
                         alternatives: str | Sequence[str] | None = None, estimator: str = "all",
                         cost_mode: str = PATH_DEFAULTS["path+mask"]["cost_mode"], temperature: float = 5.0,
                         temperature_decay: float = 0.8, warmup_seed_share: float = 0.5,
                         seed_logit: float = PATH_DEFAULTS["path+mask"]["seed_logit"],
                         argmax_share: float = PATH_DEFAULTS["path+mask"]["argmax_share"]) -> PathMaskSpace:
    """The path method's supernet (options as for method="path") with the mask method's channel masks."""
    if cost_mode not in PATH_MASK_COST_MODES:
        raise DuccioError(f"the path+mask method has no {cost_mode!r} costs", where="--path-costs",
                          fix=f"use one of: {', '.join(PATH_MASK_COST_MODES)}")
    context = context or PassContext()
    options = dict(cost_mode=cost_mode, temperature=temperature, temperature_decay=temperature_decay,
                   warmup_seed_share=warmup_seed_share, seed_logit=seed_logit, argmax_share=argmax_share)
    gm, insertion, seed_terms = build_supernet(model, example_inputs, leaf_modules=leaf_modules, context=context,
                                               alternatives=alternatives, estimator=estimator, **options)
    channels, masking = ChoiceChannels(), MaskInsertion(threshold=threshold)
    context.run(gm, [channels, masking, ChoiceMaskInsertion()])
    examples = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    dropped = {p: {**insertion.dropped.get(p, {}), **channels.dropped.get(p, {})}
               for p in {*insertion.dropped, *channels.dropped}}
    return PathMaskSpace(gm, insertion.fixed, seed_terms, channels.terms, examples, dropped=dropped,
                         frozen=channels.frozen, excluded=masking.excluded, **options)
