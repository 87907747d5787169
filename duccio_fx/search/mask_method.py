"""The mask-based search method (PIT-like DNAS): trainable channel masks, costs, the shrinking export.

    sm = duccio_fx.make_searchable(model, example_input)       # method="mask"
    loss = task_loss + lam * torch.relu(sm.costs()["params"] - target)
    small = sm.export()                                          # plain nn.Module, fewer channels

With `bits=(2, 4, 8)` every quantisable layer also searches its weight precision, with `act_bits` its output's
(`duccio_fx.search.precision`; `channels=False` searches the precisions alone).

The IR keeps its typed annotations through mask insertion; they travel with the module through
`torch.save` (pickling a GraphModule drops `meta`, so the module gives them back when it is loaded), and a
`state_dict` loads into a fresh `make_searchable` of the same seed.
"""

from __future__ import annotations

import copy
import numbers
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
from duccio_fx.passes.precision_export import PrecisionExport
from duccio_fx.passes.precision_insertion import PrecisionInsertion
from duccio_fx.passes.shrink_export import ShrinkExport
from duccio_fx.pipeline import analyze
from duccio_fx.search.precision import ACT_BANK, PrecisionBank, WidthRules
from duccio_fx.search.precision import BANK as PRECISION
from duccio_fx.search.space import SearchSpace, register_search_method
from duccio_fx.targets import Target, load_target


class SearchableModel(SearchSpace):
    """A model whose searchable channel groups carry trainable masks (mask-based DNAS)."""

    def __init__(self, graph_module: GraphModule, excluded: dict[int, str], *,
                 bits_excluded: dict[str, str] | None = None, channels: bool = True,
                 temperature: float = 5.0, temperature_decay: float = 0.8,
                 act_excluded: dict[str, str] | None = None, act_reads: dict[str, str] | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.excluded = dict(excluded)
        self.bits_excluded = dict(bits_excluded or {})  # layer -> why its weight precision is not searched
        self.act_excluded = dict(act_excluded or {})  # layer -> why its output precision is not searched
        self.act_reads = dict(act_reads or {})  # layer -> the searched layer whose output it reads
        self.channels = channels  # False: the masks stay all-ones (a precision-only search)
        self.temperature, self.temperature_decay = temperature, temperature_decay
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

    @property
    def precision(self) -> PrecisionBank | None:
        """The weight-precision θ (with `bits=`), else None."""
        return getattr(self.graph_module, PRECISION, None)

    @property
    def act_precision(self) -> PrecisionBank | None:
        """The output-precision θ (with `act_bits=`), else None."""
        return getattr(self.graph_module, ACT_BANK, None)

    def _banks(self) -> list[PrecisionBank]:
        return [b for b in (self.precision, self.act_precision) if b is not None]

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """The α vector (unless `channels=False`) and the precisions' θ (train them without weight decay)."""
        params = list(self.bank.parameters()) if self.bank is not None and getattr(self, "channels", True) else []
        params += [bank.theta for bank in self._banks()]
        return iter(params)

    def on_epoch(self, epoch: int) -> None:
        """The precisions' Gumbel temperature: `temperature` x `temperature_decay`^epoch."""
        for bank in self._banks():
            bank.temperature = self.temperature * self.temperature_decay ** epoch

    def weight_bits(self) -> dict[str, int]:
        """The weight width every searched layer would be exported at (argmax θ), by module name."""
        return self.precision.choice() if self.precision is not None else {}

    def act_bits(self) -> dict[str, int]:
        """The output width every searched layer would be exported at (argmax θ), by module name."""
        return self.act_precision.choice() if self.act_precision is not None else {}

    def architecture(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.precision is not None:
            out["weight_bits"] = self.weight_bits()
        if self.act_precision is not None:
            out["act_bits"] = self.act_bits()
        return out

    def precision_report(self, activations: bool = False) -> list[dict[str, Any]]:
        """Per quantisable layer: the weight (or, with `activations`, output) width it would be exported at,
        the probability of each width (softmax θ), or why its width is not searched (`note`)."""
        bank = self.act_precision if activations else self.precision
        if bank is None:
            return []
        probs = torch.softmax(bank.logits().detach().double(), 1).cpu().tolist()
        barred = bank.barred.cpu().tolist()
        rows = []
        for (name, bits), p, off, note in zip(bank.choice().items(), probs, barred, bank.notes):
            widths = [b for b, no in zip(bank.widths, off) if not no]
            rows.append({"layer": name, "bits": bits, "widths": widths, "note": note,
                         "probabilities": {str(b): q for b, q, no in zip(bank.widths, p, off) if not no}})
        excluded = self.act_excluded if activations else self.bits_excluded
        rows += [{"layer": name, "bits": None, "widths": [], "probabilities": {}, "note": f"not searched: {why}"}
                 for name, why in excluded.items()]
        return rows

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

    @property
    def channel_multiple(self) -> int:
        """N of `make_searchable(..., channel_multiple=N)`: the masks keep or remove blocks of N channels."""
        return getattr(self.bank, "block", 1) if self.bank is not None else getattr(self, "_multiple", 1)

    def set_masks(self, masks: dict[int, torch.Tensor]) -> None:
        """Set groups' masks, one bool per channel (α = 1 where kept, 0 where removed; the largest-α channel,
        or block, always stays). With `channel_multiple` N > 1 a mask keeps or removes whole blocks of N."""
        ids = {g.id: i for i, g in enumerate(self.channel_groups)}
        for gid, mask in masks.items():
            if gid not in ids:
                raise DuccioError(f"channel group {gid} is not searchable", where="SearchableModel.set_masks",
                                  fix=f"use one of the ids of .channel_groups: {sorted(ids)}")
            index = ids[gid]
            alpha = self.bank.group_alpha(index)
            mask = torch.as_tensor(mask, dtype=torch.bool)
            channels = self.bank.sizes[index]
            if mask.shape != (channels,):
                raise DuccioError(f"mask for group {gid} has shape {tuple(mask.shape)}, expected ({channels},)",
                                  where="SearchableModel.set_masks")
            blocks = self.bank.block_sizes[index]
            if len(blocks) != channels:  # blocks of N: every block all kept or all removed
                mask = mask.cpu()
                starts = self.bank.block_starts(index)
                for k, (start, n) in enumerate(zip(starts, blocks)):
                    part = mask[start:start + n]
                    if part.any() and not part.all():
                        raise DuccioError(
                            f"mask for group {gid} keeps part of block {k} (channels {start}..{start + n - 1}): "
                            f"this space keeps or removes whole blocks of {self.channel_multiple} channels",
                            where="SearchableModel.set_masks",
                            fix=f"keep or remove channels {start}..{start + n - 1} together (a block-aligned "
                                f"mask), or build the space with channel_multiple=1 for per-channel masks")
                mask = torch.stack([mask[s] for s in starts])
            with torch.no_grad():
                alpha.copy_(mask.to(alpha.dtype))

    # -- costs --------------------------------------------------------------------------------------
    def program(self) -> CostProgram:
        """The layer terms compiled against the searchable groups (built once)."""
        if getattr(self, "_program", None) is None:  # (a model pickled before programs existed has none)
            self._program = CostProgram(self.terms, [(g.id, g.channels) for g in self.channel_groups])
        return self._program

    def _bits_columns(self, hw: Target | None, chosen: bool = False, narrowest: bool = False
                      ) -> dict[str, torch.Tensor | None]:
        """Every layer's weight, input and output widths for the costs: searched layers from the banks' g (the
        last forward pass's sample; the argmax with `chosen`; the narrowest width with `narrowest`), the others
        at their own width."""
        out: dict[str, torch.Tensor | None] = {"weight_bits": None, "in_bits": None, "out_bits": None}
        if hw is None:
            return out
        table = self.program().table
        for key, bank, column, default in (("weight_bits", self.precision, "weight_bits", hw.bits.weights),
                                           ("out_bits", self.act_precision, "act_bits", hw.bits.activations),
                                           ("in_bits", self.act_precision, "in_act_bits", hw.bits.activations)):
            if bank is None:
                continue
            rows, which = self._bits_rows(key)
            device = bank.theta.device
            bits = bank.layer_bits(chosen)
            if narrowest:
                bits = torch.full_like(bits.detach(), float(min(bank.widths)))
            base = table.resolved_bits(column, default).to(device)
            out[key] = base.index_copy(0, rows.to(device), bits.index_select(0, which.to(device)))
        return out

    def _bits_rows(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Which cost-table rows take a searched width, and the bank row of each: a layer's own row for its
        weights and output (a module's later calls, `<module>#k`, share it), the row of the layer it reads for
        its input."""
        cache = self.__dict__.setdefault("_rows_cache", {})
        if key not in cache:
            bank = self.precision if key == "weight_bits" else self.act_precision
            index = {name: i for i, name in enumerate(bank.layers)}
            if key == "in_bits":
                pairs = [(r, index[self.act_reads[t.name]]) for r, t in enumerate(self.terms)
                         if t.name in self.act_reads]
            else:
                pairs = [(r, index[t.name.split("#")[0]]) for r, t in enumerate(self.terms)
                         if t.name.split("#")[0] in index]
            cache[key] = (torch.tensor([p[0] for p in pairs], dtype=torch.long),
                          torch.tensor([p[1] for p in pairs], dtype=torch.long))
        return cache[key]

    def cost_values(self, target: Target | str | None = None) -> Costs:
        """Costs (floats) of the architecture `export()` returns now: the argmax precisions."""
        hw = load_target(target) if target is not None else None
        with torch.no_grad():
            return self.program().costs(self._flat_masks(), hw, **self._bits_columns(hw, chosen=True)).floats()

    def costs(self, target: Target | str | None = None) -> Costs:
        """Costs of the binarized architecture, differentiable w.r.t. the α (straight-through).

        `params`: conv/linear weights + biases; `macs`: per sample; `layer_memory`: per layer,
        weights + input + output activation elements (= bytes at 8 bit). With a `target` (a Target, a
        name or a path) also `size_bytes`, `layer_bytes` (DORY's accounting), `layer_cycles`, `cycles`,
        `latency_s` and `overflow_bytes` (per layer-wise level; L2V on GAP8). One vectorised evaluation
        over all layers (`CostProgram`): a fixed number of ops whatever the depth, and no host sync.
        """
        hw = load_target(target) if target is not None else None
        return self.program().costs(self._flat_masks(), hw, **self._bits_columns(hw))

    def minimum_masks(self) -> dict[int, torch.Tensor]:
        """One channel (one block with `channel_multiple` N > 1: the smallest, so the last one when N does
        not divide the group's width) per searchable group: the smallest architecture the space holds."""
        if self.bank is None or self.channel_multiple == 1:
            return {g.id: torch.nn.functional.one_hot(torch.tensor(0), g.channels).double()
                    for g in self.channel_groups}
        out = {}
        for index, (g, blocks) in enumerate(zip(self.channel_groups, self.bank.block_sizes)):
            k = min(range(len(blocks)), key=lambda i: (blocks[i], i))
            start = self.bank.block_starts(index)[k]
            mask = torch.zeros(g.channels, dtype=torch.float64)
            mask[start:start + blocks[k]] = 1
            out[g.id] = mask
        return out

    def minimum_costs(self, target: Target | str | None = None) -> Costs:
        hw = load_target(target) if target is not None else None
        program = self.program()
        masks = program.flatten(self.minimum_masks()) if getattr(self, "channels", True) else \
            self._flat_masks().detach()  # every channel kept
        with torch.no_grad():  # every searched layer at the narrowest widths
            return program.costs(masks, hw, **self._bits_columns(hw, narrowest=True)).floats()

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

    def width_report(self) -> list[dict[str, Any]]:
        """Per channel group of the seed (analysis order): its width, how the search cuts it and what it
        keeps now. `blocks`: the channels of each mask entry (searchable groups); `kept`: the channels the
        current masks keep; `multiple_holds`: whether every width the search can reach is a multiple of
        `channel_multiple` (False for a group N does not divide: then only widths without the last, smaller
        block are); `note`: why not, or why the group is not searched."""
        n = self.channel_multiple
        searched = {g.id: i for i, g in enumerate(self.channel_groups)}
        masks = self.masks()
        rows = []
        for g in self.all_groups:
            row: dict[str, Any] = {"id": g.id, "channels": g.channels, "producers": list(g.producers)}
            if g.id in searched:
                blocks = self.bank.block_sizes[searched[g.id]]
                kept = int(masks[g.id].sum())
                holds = g.channels % n == 0
                row.update(searchable=True, blocks=blocks, kept=kept, kept_multiple=kept % n == 0,
                           multiple_holds=holds,
                           note="" if holds else (f"{g.channels} is not a multiple of {n}: blocks of {n} and a last "
                                                  f"block of {blocks[-1]}; the kept width is a multiple of {n} only "
                                                  f"when the search removes that last block"))
            else:
                reason = self.excluded.get(g.id) or g.reason or "frozen"
                row.update(searchable=False, blocks=[g.channels], kept=g.channels,
                           kept_multiple=g.channels % n == 0, multiple_holds=g.channels % n == 0,
                           note=f"not searched: {reason}")
            rows.append(row)
        return rows

    # -- export -------------------------------------------------------------------------------------
    def export(self, context: PassContext | None = None) -> GraphModule:
        """A plain model of ordinary torch modules holding only the kept channels (eval-exact)."""
        gm = copy.deepcopy(self.graph_module)
        passes = [PrecisionExport(self.weight_bits(), self.act_bits())] if self._banks() else []
        (context or PassContext()).run(gm, passes + [ShrinkExport(self.masks())])
        gm.train(self.training)
        return gm


@register_search_method("mask")
def make_mask_space(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[LeafSpec] = (),
                    context: PassContext | None = None, threshold: float = 0.5,
                    channel_multiple: int = 1, bits: Sequence[int] | Sequence[str] | None = None,
                    channels: bool = True, temperature: float = 5.0, temperature_decay: float = 0.8,
                    act_bits: Sequence[int] | Sequence[str] | None = None) -> SearchableModel:
    """Analyse a copy of `model` and insert one trainable mask per searchable channel group.

    `channel_multiple` N > 1: hardware-friendly widths: each mask entry keeps or removes a block of N
    channels, so every group keeps a multiple of N (e.g. 4 for PULP-NN's channel blocking, 8 or 16 for
    GAP9's NE16). Groups of at most N channels are not searched; a group whose width N does not divide ends
    with a smaller block (`SearchableModel.width_report()` says which).

    `bits` (e.g. (2, 4, 8), or per layer `["2,4,8", "stage3.*=4,8", "fc1=8"]`: fnmatch patterns on module
    names, the last match wins): also search every quantisable layer's weight width among these
    (Gumbel-softmax over θ, `temperature` at the first search epoch times `temperature_decay` each epoch);
    `act_bits`: its output's width alike (PACT quantizers with a learned range); `channels=False`: search the
    widths alone (the masks stay all-ones)."""
    check_channel_multiple(channel_multiple)
    widths = WidthRules(bits, "bits") if bits is not None else None
    act_widths = WidthRules(act_bits, "act_bits") if act_bits is not None else None
    if not channels and widths is None and act_widths is None:
        raise DuccioError("channels=False leaves nothing to search", where="make_searchable(..., channels=False)",
                          fix="give bits=(2, 4, 8) (or act_bits=...) to search the precisions alone, or keep "
                              "channels=True")
    context = context or PassContext()
    gm = analyze(copy.deepcopy(model), example_inputs, leaf_modules, context=context)
    insertion = MaskInsertion(threshold=threshold, channel_multiple=int(channel_multiple))
    precision = PrecisionInsertion(widths, act_widths) if widths or act_widths else None
    context.run(gm, [insertion] + ([precision] if precision is not None else []))
    space = SearchableModel(gm, insertion.excluded, bits_excluded=precision.excluded if precision else None,
                            channels=channels, temperature=temperature, temperature_decay=temperature_decay,
                            act_excluded=precision.act_excluded if precision else None,
                            act_reads=precision.reads if precision else None)
    if not channels and space.bank is not None:
        space.bank.alpha.requires_grad_(False)  # every channel stays: α is neither searched nor trained
    space._multiple = int(channel_multiple)  # (the bank holds it too; this covers a model with nothing searchable)
    return space


def check_channel_multiple(value: Any, where: str = "channel_multiple") -> int:
    """N of `--channel-multiple N`: a whole number >= 1, else a DuccioError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise DuccioError(f"{where} must be a whole number >= 1, got {value!r}", where=where,
                          fix="e.g. 4 (PULP-NN's channel blocking on GAP8), 8 or 16 (GAP9's NE16); 1 searches "
                              "every channel on its own")
    return int(value)
