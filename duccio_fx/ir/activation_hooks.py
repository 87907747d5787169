"""The "activation" hooks of the op registry: a fresh module that computes what an element-wise activation
node computes, or None when this call cannot be rebuilt as one (extra arguments it does not know).

The supernet-insertion pass asks them to recognise a conv block's activation and to put a copy of it into
every alternative; the table in `builtin_rules` attaches them, so the op knowledge stays in one place.
"""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn
from torch.fx import GraphModule, Node

ActivationHook = Callable[[GraphModule, Node], "nn.Module | None"]


def copy_module(gm: GraphModule, node: Node) -> nn.Module:
    """An activation module (ReLU, GELU, PReLU, ...): a copy, with its settings and parameters."""
    return copy.deepcopy(gm.get_submodule(str(node.target)))


def as_module(cls: type[nn.Module]) -> ActivationHook:
    """`torch.relu(x)`, `x.sigmoid()`, ...: the module class computing the same, for a one-argument call."""
    def hook(gm: GraphModule, node: Node) -> nn.Module | None:
        return cls() if len(node.args) == 1 and not node.kwargs else None
    return hook


def hardtanh_module(gm: GraphModule, node: Node) -> nn.Module | None:
    """`F.hardtanh(x, lo, hi)` with constant bounds."""
    bounds = list(node.args[1:3]) + [node.kwargs[k] for k in ("min_val", "max_val") if k in node.kwargs]
    return nn.Hardtanh(*map(float, bounds)) if all(isinstance(b, (int, float)) for b in bounds) else None
