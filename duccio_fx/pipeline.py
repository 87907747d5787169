"""The analysis pipeline, as straight-line functions: a model in, an annotated IR (or its costs) out.

It stands above the IR and the cost model (its last pass writes the cost terms) and below the search and
the lowering backends, which start from what it returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn
from torch.fx import GraphModule

from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.model import Costs
from duccio_fx.costs.program import plain_costs
from duccio_fx.ir.channels import ChannelGroup
from duccio_fx.ir.meta import GROUPS_KEY, layer_terms, tensor_info
from duccio_fx.ir.pass_manager import Instrument, PassContext
from duccio_fx.ir.tracer import LeafSpec, as_input_tuple, locate_errors, symbolic_trace
from duccio_fx.passes.channel_analysis import ChannelAnalysis
from duccio_fx.passes.functional_layers import FunctionalLayers
from duccio_fx.passes.layer_costs import LayerCosts
from duccio_fx.passes.shape_propagation import ShapePropagation
from duccio_fx.targets import Target, load_target


def _context(instruments: Sequence[Instrument], context: PassContext | None) -> PassContext:
    return context if context is not None else PassContext(instruments)


def trace(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[LeafSpec] = (),
          instruments: Sequence[Instrument] = (), *, context: PassContext | None = None) -> GraphModule:
    """Trace `model` and record the shape and dtype of every node's value on `example_inputs`.

    `example_inputs` is one tensor or a tuple of tensors (batch dim first). `leaf_modules` are module
    classes or qualified names to keep opaque (give them a channel rule with `register_module`).
    """
    gm = symbolic_trace(model, leaf_modules)
    with locate_errors(model, leaf_modules):
        _context(instruments, context).run(gm, [
            ShapePropagation(as_input_tuple(example_inputs)),  # shapes and dtypes of every value
            FunctionalLayers(),                                # F.conv/F.linear/F.batch_norm on parameters -> modules
        ])
    return gm


def analyze(model: nn.Module, example_inputs: Any, leaf_modules: Sequence[LeafSpec] = (),
            instruments: Sequence[Instrument] = (), *, context: PassContext | None = None) -> GraphModule:
    """Trace `model` and run every analysis pass on it; the IR carries shapes, groups and costs."""
    gm = symbolic_trace(model, leaf_modules)
    with locate_errors(model, leaf_modules):
        _context(instruments, context).run(gm, [
            ShapePropagation(as_input_tuple(example_inputs)),  # shapes and dtypes of every value
            FunctionalLayers(),                                # F.conv/F.linear/F.batch_norm on parameters -> modules
            ChannelAnalysis(),                                 # coupled channels → channel groups
            LayerCosts(),                                      # per-layer terms: params, MACs, activation bytes
        ])
    return gm


def channel_groups(gm: GraphModule) -> list[ChannelGroup]:
    """The channel groups of a traced model (runs channel-analysis if it has not run yet)."""
    if GROUPS_KEY not in gm.meta:
        if not any(tensor_info(n) is not None for n in gm.graph.nodes):
            raise DuccioError("the graph has no shapes recorded, so its channels cannot be analysed",
                              where=f"GraphModule {gm._get_name()}",
                              fix="create it with duccio_fx.trace(model, example_inputs)")
        PassContext().run(gm, [ChannelAnalysis()])
    return list(gm.meta[GROUPS_KEY])


def graph_costs(gm: GraphModule, target: Target | str | Path | None = None) -> Costs:
    """The costs of an analysed graph with every channel kept (numbers, not tensors). `target`: a Target, a
    target name (`"gap8"`) or a TOML path."""
    terms = layer_terms(gm)
    return plain_costs(terms, load_target(target) if target is not None else None)


def measure_costs(model: nn.Module, example_inputs: Any, target: Target | str | Path | None = None, *,
                  context: PassContext | None = None) -> Costs:
    """Costs of a plain (e.g. exported) model, measured on its own graph: what constraints are checked on.
    `example_inputs`: a tensor or a tuple of tensors; `target` as for graph_costs."""
    hw = load_target(target) if target is not None else None  # a bad name fails before the analysis
    inputs = tuple(x[:1] for x in as_input_tuple(example_inputs))
    return graph_costs(analyze(model, inputs, context=context), hw)
