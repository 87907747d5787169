"""layer-costs: per-sample weights, MACs and activation bytes of every node.

Writes the `LayerTerm` of every conv/linear layer (the static facts the cost formulas evaluate, so the
search and the exported model are costed by the same formula) and the `LayerCost` of every node: `params`
counts conv and linear weights and biases (BatchNorm is folded away on deployment, so it is not counted);
MACs are `weights x output positions` for convolutions and `in x out` for linear layers. Activation bytes
use the tensors' own dtype here; a target's bit widths apply later.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch.fx import GraphModule

from duccio_fx.costs.terms import evaluate_term, term_of, value
from duccio_fx.ir.meta import LayerCost, TensorInfo, ValueInfo, set_layer_cost, set_layer_term, tensor_info
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.rule_api import iter_nodes


def value_bytes(info: ValueInfo, batch: int) -> int:
    """Bytes of one sample of a (tuple of) tensor value(s)."""
    if isinstance(info, TensorInfo):
        return info.numel // max(batch, 1) * info.dtype.itemsize
    if isinstance(info, tuple):
        return sum(value_bytes(i, batch) for i in info)
    return 0


@dataclass
class LayerCosts(Pass):
    """Writes `duccio_layer_term` on conv/linear nodes and `duccio_cost` on every node."""

    name = "layer-costs"
    requires = ("shape-propagation", "channel-analysis")

    def run(self, gm: GraphModule) -> bool:
        batch = next((i.shape[0] for n in gm.graph.nodes if n.op == "placeholder"
                      for i in [tensor_info(n)] if isinstance(i, TensorInfo) and i.shape), 1)
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            params = macs = 0
            term = term_of(gm, node)
            if term is not None:
                calls[term.name] = calls.get(term.name, 0) + 1
                if calls[term.name] > 1:  # a module called again: its MACs count again, its weights do not
                    term = replace(term, name=f"{term.name}#{calls[term.name]}", shares_weights_of=term.name)
                set_layer_term(node, term)
                values = evaluate_term(term, {})
                params, macs = int(value(values.params)), int(value(values.macs))
            in_bytes = sum(value_bytes(tensor_info(a), batch) for a in dict.fromkeys(iter_nodes(node.args)))
            out_bytes = 0 if node.op == "output" else value_bytes(tensor_info(node), batch)
            set_layer_cost(node, LayerCost(params, macs, in_bytes, out_bytes))
        return False
