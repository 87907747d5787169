"""The default analysis pipeline, as one straight-line function."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn
from torch.fx import GraphModule

from duccio_fx.errors import DuccioError
from duccio_fx.meta import GROUPS_KEY, tensor_info
from duccio_fx.channels import ChannelGroup
from duccio_fx.pass_manager import Instrument, PassManager
from duccio_fx.passes import ChannelAnalysis, LayerCosts, ShapePropagation
from duccio_fx.tracer import LeafSpec, as_input_tuple, locate_errors, symbolic_trace


def analyze(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[LeafSpec] = (),
            instruments: Sequence[Instrument] = ()) -> GraphModule:
    """Trace `model` and run every analysis pass on it; the IR carries shapes, groups and costs."""
    gm = symbolic_trace(model, leaf_modules)
    with locate_errors(model, leaf_modules):
        PassManager([
            ShapePropagation(as_input_tuple(example_inputs)),  # shapes and dtypes of every value
            ChannelAnalysis(),                                 # coupled channels → channel groups
            LayerCosts(),                                      # per-layer params, MACs, activation bytes
        ], instruments).run(gm)
    return gm


def channel_groups(gm: GraphModule) -> list[ChannelGroup]:
    """The channel groups of a traced model (runs channel-analysis if it has not run yet)."""
    if GROUPS_KEY not in gm.meta:
        if not any(tensor_info(n) is not None for n in gm.graph.nodes):
            raise DuccioError("the graph has no shapes recorded, so its channels cannot be analysed",
                              where=f"GraphModule {gm._get_name()}",
                              fix="create it with duccio_fx.trace(model, example_inputs)")
        PassManager([ChannelAnalysis()]).run(gm)
    return list(gm.meta[GROUPS_KEY])
