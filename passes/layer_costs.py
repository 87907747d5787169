"""layer-costs: per-sample weights, MACs and activation bytes of every node (DESIGN §4 cost model).

`params` counts conv and linear weights and biases (BatchNorm is folded away on deployment, so it is not
counted); MACs are `weights x output positions` for convolutions and `in x out` for linear layers.
Activation bytes use the tensors' own dtype here; a target's bit widths apply later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.meta import LayerCost, TensorInfo, ValueInfo, set_layer_cost, tensor_info
from duccio_fx.pass_manager import Pass
from duccio_fx.rules import iter_nodes


def value_bytes(info: ValueInfo, batch: int) -> int:
    """Bytes of one sample of a (tuple of) tensor value(s)."""
    if isinstance(info, TensorInfo):
        return info.numel // max(batch, 1) * info.dtype.itemsize
    if isinstance(info, tuple):
        return sum(value_bytes(i, batch) for i in info)
    return 0


def module_params_macs(module: nn.Module, node: Node) -> tuple[int, int]:
    """Weights (+ bias) and MACs per sample of a conv or linear module; (0, 0) for anything else."""
    out = tensor_info(node)
    if not isinstance(out, TensorInfo):
        return 0, 0
    if isinstance(module, nn.modules.conv._ConvNd):
        weights = module.weight.numel()
        params = weights + (module.bias.numel() if module.bias is not None else 0)
        if module.transposed:
            src = tensor_info(node.args[0]) if isinstance(node.args[0], Node) else None
            positions = math.prod(src.shape[2:]) if isinstance(src, TensorInfo) else 0
        else:
            positions = math.prod(out.shape[2:])
        return params, weights * positions
    if isinstance(module, nn.Linear):
        weights = module.weight.numel()
        params = weights + (module.bias.numel() if module.bias is not None else 0)
        return params, weights * math.prod(out.shape[1:-1])
    return 0, 0


@dataclass
class LayerCosts(Pass):
    """Writes `duccio_cost` on every node. Needs shape-propagation."""

    name = "layer-costs"

    def run(self, gm: GraphModule) -> bool:
        batch = next((i.shape[0] for n in gm.graph.nodes if n.op == "placeholder"
                      for i in [tensor_info(n)] if isinstance(i, TensorInfo) and i.shape), 1)
        for node in gm.graph.nodes:
            params = macs = 0
            if node.op == "call_module":
                params, macs = module_params_macs(gm.get_submodule(str(node.target)), node)
            in_bytes = sum(value_bytes(tensor_info(a), batch) for a in dict.fromkeys(iter_nodes(node.args)))
            out_bytes = 0 if node.op == "output" else value_bytes(tensor_info(node), batch)
            set_layer_cost(node, LayerCost(params, macs, in_bytes, out_bytes))
        return False
