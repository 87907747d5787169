"""choice-channels: put the layers of a supernet's alternatives into the seed's channel groups (path+mask).

supernet-insertion analysed each alternative on its own, so its layers' channel specs name the alternative's
own groups. A choice point's block reads the seed's groups of its input and writes those of its output, so
the alternative's input group becomes the block's input spec, its output group the block's output spec,
and any group inside it a group of its own that is never searched (`terms`). Then the masks of the seed's
groups apply to every alternative alike (the mask method's masks, shared by all alternatives).

Where that cannot hold the pass says so and changes the search space, not the masks' meaning:
* an alternative whose output is its input (identity, a depthwise-only block) keeps the input's channels,
  so where the block's input and output are different groups it is removed from the point (`dropped`);
* an alternative whose layers read part of the input or output group, or whose first channel-mixing layers
  are not parts of a sequence (the mask could not be handed to them), keeps the block's input and output
  groups whole: they are frozen (`frozen`).

Each point learns which parts of each alternative mix the block's input channels (`mask_readers`: its conv
and linear layers whose input is the whole input group, as the alternative's own analysis found them);
choice-mask-insertion gives them the input's mask once mask-insertion has made the bank.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import GROUPS_KEY, ChannelSpec, ChoiceInfo, LayerTerm, channel_layout, choice_info, \
    set_choice_info, spec_of
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.search.choice_point import ChoicePoint
from duccio_fx.search.masks import MASKED

PASS_THROUGH = ("its output is its input, whose channels the masks keep apart from the block's output (path+mask "
                "offers it only where the block's input and output are one channel group)")


@dataclass
class ChoiceChannels(Pass):
    """Needs supernet-insertion. Results: `terms` ((point, alternative) → its layers in the seed's groups),
    `dropped` (point → {alternative: why}) and `frozen` (group id → why the masks keep it whole)."""

    terms: dict[tuple[str, str], tuple[LayerTerm, ...]] = field(default_factory=dict)
    dropped: dict[str, dict[str, str]] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)
    name = "choice-channels"
    requires = ("channel-analysis", "supernet-insertion")

    def run(self, gm: GraphModule) -> bool:
        groups = {g.id for g in gm.meta[GROUPS_KEY]}
        fresh = iter(range(-2, -10 ** 9, -1))  # groups inside alternatives: never searched
        for node in [n for n in gm.graph.nodes if choice_info(n) is not None]:
            self._point(gm, node, groups, fresh)
        gm.meta[GROUPS_KEY] = tuple(replace(g, frozen=True, reason=self.frozen[g.id]) if g.id in self.frozen else g
                                    for g in gm.meta[GROUPS_KEY])
        return bool(self.terms)

    def _point(self, gm: GraphModule, node: Node, groups: set[int], fresh: Iterator[int]) -> None:
        info: ChoiceInfo = choice_info(node)
        point: ChoicePoint = gm.get_submodule(str(node.target))
        source = node.args[0]
        spec_in = spec_of(channel_layout(source), 0) if isinstance(source, Node) else ()
        spec_out = spec_of(channel_layout(node), 0)
        kept, readers = [], {}
        for option in info.options:
            local_in, local_out = _option_groups(option.terms)
            if (not option.terms or local_in == local_out) and spec_in != spec_out and option is not info.options[0]:
                self.dropped.setdefault(info.point, {})[option.name] = PASS_THROUGH
                delattr(point, option.name)
                point.names.remove(option.name)
                continue
            parts = _mask_readers(getattr(point, option.name), f"{info.point}.{option.name}.", option.terms, local_in)
            specs = [s for t in option.terms for s in (t.in_spec, t.out_spec)]
            mapped = [_remap(s, local_in, local_out, spec_in, spec_out, fresh) for s in specs]
            if parts is None or any(m is None for m in mapped):
                for gid in {g for s in (spec_in, spec_out) for g, *_ in s if g in groups}:
                    self.frozen[gid] = (f"read or written by alternative {option.name!r} of '{info.point}', whose "
                                        "layers the masks cannot follow")
                # those groups stay whole: every channel of the alternative is then a constant
                mapped = [m if m is not None else tuple((next(fresh), lo, hi, size) for _, lo, hi, size in s)
                          for m, s in zip(mapped, specs)]
            self.terms[(info.point, option.name)] = tuple(
                replace(t, in_spec=mapped[2 * i], out_spec=mapped[2 * i + 1]) for i, t in enumerate(option.terms))
            readers[option.name] = parts or ()
            kept.append(option)
        set_choice_info(node, replace(info, options=tuple(kept)))
        point.mask_readers = readers


def _option_groups(terms: Sequence[LayerTerm]) -> tuple[int | None, int | None]:
    """The option's own group ids of its input (the first layer reads it) and its output (the last writes it)."""
    if not terms:
        return None, None
    first, last = terms[0].in_spec, terms[-1].out_spec
    return (first[0][0] if len(first) == 1 else None), (last[0][0] if len(last) == 1 else None)


def _remap(spec: ChannelSpec, local_in: int | None, local_out: int | None, spec_in: ChannelSpec,
           spec_out: ChannelSpec, fresh: Iterator[int]) -> ChannelSpec | None:
    """An option's channel spec in the seed's groups: its input group → the block's input, its output group →
    the block's output, any other (internal) group → a group of its own that is never searched (None: a
    spec that covers part of the input or output group, which the masks cannot follow)."""
    out: list[tuple[int, int, int, int]] = []
    for group, lo, hi, size in spec:
        if group in (local_in, local_out):
            whole = spec_in if group == local_in else spec_out
            width = sum((h - l) * s for _, l, h, s in whole)
            if lo != 0 or size != 1 or hi != width or len(spec) != 1:
                return None
            return whole
        out.append((next(fresh), lo, hi, size))
    return tuple(out)


def _mask_readers(alt: nn.Module, prefix: str, terms: Sequence[LayerTerm], local_in: int | None
                  ) -> tuple[str, ...] | None:
    """The parts of alternative `alt` (its layers named `prefix` + part) that mix the block's input channels:
    its conv (groups=1) and linear layers whose input is exactly the block's input group (per-channel ops may
    stand before them). They take the input's mask, so they must be parts of a sequence (None: one is nested,
    which the mask cannot reach)."""
    names = [t.name[len(prefix):] for t in terms if t.kind in ("conv", "linear")
             and len(t.in_spec) == 1 and t.in_spec[0][0] == local_in]
    if not names:
        return ()
    parts = dict(alt.named_children()) if isinstance(alt, nn.Sequential) else {}
    if any(n not in parts or type(parts[n]) not in MASKED for n in names):
        return None
    return tuple(names)
