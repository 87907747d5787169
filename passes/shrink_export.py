"""shrink-export: lower a searchable graph to a plain, physically smaller model.

Removes the mask machinery (the bank, the mask nodes, the masked twins' extra argument), then asks every
op's "shrink" hook in the op registry to rewrite it for the kept channels: convs, linears and batch norms
keep only the surviving weights, biases, running statistics and affine parameters (sliced, never
re-initialised); ops that name channel counts (split sizes, narrow, slicing, view shapes, chunk) get the new
counts. Exact by construction (see `duccio_fx.search.masks`). Which channels survive is read from the
typed channel layouts on the IR and the boolean masks by group id. The node annotations described the
seed's widths, so the exported graph leaves without them (analyse the exported model for its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import GROUPS_KEY, ChannelLayout, ChannelSpec, TensorInfo, channel_layout, spec_of, tensor_info
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.registry import REGISTRY, OpRegistry
from duccio_fx.ir.shrink_hooks import shrink_attribute
from duccio_fx.search.masks import PLAIN, kept_entries

BANK = "duccio_masks"
SELECT = "duccio_mask_select"


@dataclass
class ShrinkExport(Pass):
    """Keeps the channels whose mask is True (`masks`: group id → bool vector; absent groups stay whole)."""

    masks: Mapping[int, torch.Tensor]
    registry: OpRegistry = field(default_factory=lambda: REGISTRY)
    name = "shrink-export"
    requires = ("channel-analysis", "mask-insertion")
    _idx_cache: dict[ChannelSpec, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    gm: GraphModule | None = field(default=None, init=False, repr=False)  # the graph being exported

    # -- the ShrinkContext the hooks see (duccio_fx.ir.shrink_hooks) ------------------------------------

    def kept(self, spec: ChannelSpec) -> torch.Tensor:
        if spec not in self._idx_cache:
            self._idx_cache[spec] = kept_entries(spec, self.masks)
        return self._idx_cache[spec]

    def spec_of(self, value: Any) -> Any:
        if not isinstance(value, Node):
            return None

        def spec(layout: Any, info: Any) -> Any:
            if isinstance(layout, ChannelLayout) and isinstance(info, TensorInfo):
                return spec_of(layout, 0)
            if isinstance(layout, tuple) and isinstance(info, tuple):
                return tuple(spec(lay, i) for lay, i in zip(layout, info))
            return None

        return spec(channel_layout(value), tensor_info(value))

    def channels(self, value: Any) -> tuple[int, ChannelSpec, int] | None:
        if not isinstance(value, Node):
            return None
        layout, info = channel_layout(value), tensor_info(value)
        if not isinstance(layout, ChannelLayout) or not isinstance(info, TensorInfo):
            return None
        if not any(s.group in self.masks for s in layout.slices):
            return None
        return layout.dim, spec_of(layout, 0), len(info.shape)

    # -- the pass ------------------------------------------------------------------------------------
    def run(self, gm: GraphModule) -> bool:
        self.gm = gm
        strip_masks(gm)
        shrunk: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.op == "get_attr":
                shrink_attribute(self, node)
                continue
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if node.op == "call_module":
                if node.target in shrunk:
                    continue  # a module called again: its weights were cut at its first call
                shrunk.add(node.target)
            hook = self.registry.hook(gm, node, "shrink")
            if hook is not None:
                hook(self, node)
        for node in gm.graph.nodes:
            node.meta = {k: v for k, v in node.meta.items() if not k.startswith("duccio_")}
        gm.meta.pop(GROUPS_KEY, None)
        return True


def strip_masks(gm: GraphModule) -> None:
    """Masked twins become plain modules again and lose their mask argument; mask nodes go."""
    dead = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target == BANK or str(node.target).startswith(SELECT + "."):
            dead.append(node)
            continue
        module = gm.get_submodule(str(node.target))
        mask = node.args[1] if len(node.args) > 1 else None
        if isinstance(mask, Node) and str(mask.target).startswith(SELECT + "."):
            node.args = (node.args[0],) + tuple(node.args[2:])
        if type(module) in PLAIN:  # (a module called twice is re-classed at its first call)
            module.__class__ = PLAIN[type(module)]
    for node in reversed(dead):
        gm.graph.erase_node(node)
    for container in (BANK, SELECT):
        if hasattr(gm, container):
            delattr(gm, container)
