"""fold-batchnorm: merge each BatchNorm into the conv or linear layer that feeds it (evaluation statistics).

DORY has no BatchNorm layer: a conv's requantization carries the per-channel scale and shift. Folding is
exact in real arithmetic, `w' = w·γ/σ`, `b' = (b − μ)·γ/σ + β` with `σ = sqrt(var + eps)`, and within float
rounding in practice (tested ≤ 1e-5). The folded layer is a new module under the layer's name in the graph
module's own module tree (tracing copies that tree), so the traced model keeps its BatchNorm.
A BatchNorm whose input is not a conv/linear used only by it stays, and `dory-layers` reports it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.pass_manager import Pass

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _module(gm: GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def fold(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of `layer` (conv or linear) that computes `bn(layer(x))` with evaluation statistics."""
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        weight = folded.weight.double() * scale.double().reshape(-1, *([1] * (folded.weight.dim() - 1)))
        bias = folded.bias.double() if folded.bias is not None else torch.zeros_like(mean, dtype=torch.float64)
        new_bias = (bias - mean.double()) * scale.double() + beta.double()
        folded.weight = nn.Parameter(weight.to(folded.weight.dtype))
        folded.bias = nn.Parameter(new_bias.to(folded.weight.dtype))
    return folded


@dataclass
class FoldBatchNorm(Pass):
    """Replaces every conv/linear → BatchNorm pair by one folded layer."""

    name = "fold-batchnorm"
    requires = ("shape-propagation",)

    def run(self, gm: GraphModule) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            bn = _module(gm, node)
            if not isinstance(bn, _NORMS) or not node.args:
                continue
            producer = node.args[0]
            layer = _module(gm, producer)
            if not isinstance(layer, _FOLDABLE) or len(producer.users) != 1:
                continue
            if isinstance(layer, nn.Linear) != isinstance(bn, nn.BatchNorm1d):
                continue
            gm.add_submodule(str(producer.target), fold(layer, bn))
            node.replace_all_uses_with(producer)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.delete_all_unused_submodules()
        return changed
