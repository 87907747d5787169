"""remove-noops: take out of the graph what computes nothing in inference, before the DORY lowering groups it.

* `torch._assert` checks: traced models (timm's) assert shapes (`_assert(x.ndim == 4, ...)`); they held for
  the shapes shape propagation recorded, and no layer computes them.
* the values only those checks read: `x.ndim`, `x.shape`, `x.dtype` (a `getattr`), `x.dim()`, `x.size()`, and
  the comparisons and indexing on them, once nothing else uses them.
* calls of `nn.Identity` (timm's `drop_block`, `drop`, `se` placeholders): their users read the input instead.

Without this, an activation after an `nn.Identity` (`conv → bn → drop_block → act` in timm's ResNet) would
follow no layer, and an assert would be an op DORY has no kernel for. Dropout stays: the calibrated graph is
also what quantization-aware fine-tuning trains.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import TensorInfo, tensor_info
from duccio_fx.ir.pass_manager import Pass

_ASSERTS = {torch._assert}
_METADATA_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"dim", "size", "numel"}
_VALUE_FUNCTIONS = {builtins.len, builtins.isinstance, builtins.str, builtins.int, builtins.float, builtins.bool}


def is_plain_identity(m: nn.Module) -> bool:
    """An nn.Identity whose forward is nn.Identity's own (a subclass may compute something)."""
    return isinstance(m, nn.Identity) and type(m).forward is nn.Identity.forward


def _is_identity_call(gm: GraphModule, node: Node) -> bool:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return False
    return is_plain_identity(gm.get_submodule(str(node.target)))


def _is_pure_value(node: Node) -> bool:
    """A node that computes a Python value (no tensor) from tensors' metadata, without side effects."""
    if isinstance(tensor_info(node), TensorInfo):
        return False
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op != "call_function":
        return False
    if node.target is builtins.getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    if node.target in (operator.setitem, operator.delitem):
        return False
    return getattr(node.target, "__module__", None) in ("_operator", "operator") \
        or node.target in _VALUE_FUNCTIONS


@dataclass
class RemoveNoops(Pass):
    """Erases asserts, the metadata reads only they used, and identity calls."""

    name = "remove-noops"
    requires = ("shape-propagation",)

    def run(self, gm: GraphModule) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _ASSERTS:
                gm.graph.erase_node(node)
                changed = True
            elif _is_identity_call(gm, node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                changed = True
        for node in reversed(list(gm.graph.nodes)):  # users before what they read: chains go in one sweep
            if not node.users and _is_pure_value(node):
                gm.graph.erase_node(node)
                changed = True
        return changed  # the unused nn.Identity modules stay in the tree: they hold nothing
