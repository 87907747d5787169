"""choice-export: lower a path-method supernet to a plain model holding only the chosen alternatives.

Each choice point becomes `nn.Sequential(<alternative name>=<its module>)` under the point's name, so the
exported layers are named `<point>.<alternative>.<layer>`, exactly as the search's cost tables name them;
a chosen `nn.Identity` removes the node. The modules are the searched ones (weights, BatchNorm statistics),
so the exported model computes what the search model computes in evaluation mode.

A tensor of an alternative that the model also reads elsewhere (a `get_attr`, e.g. the seed conv's weight in
`x.to(self.conv.weight.dtype)`) stays reachable: under the chosen alternative it keeps its name; in one that is
not chosen it is kept as an attribute of the exported model (the `get_attr` names it there, e.g.
`conv_conv3_conv_weight`), so every such use computes what it computed in the search model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import CHOICE_KEY, choice_info
from duccio_fx.ir.pass_manager import Pass


@dataclass
class ChoiceExport(Pass):
    """`choices`: point → alternative name; points not named take the argmax of their θ."""

    choices: Mapping[str, str] = field(default_factory=dict)
    name = "choice-export"
    requires = ("supernet-insertion",)

    def run(self, gm: GraphModule) -> bool:
        changed = False
        attrs = [n for n in gm.graph.nodes if n.op == "get_attr"]
        for node in list(gm.graph.nodes):
            info = choice_info(node)
            if info is None:
                continue
            point = gm.get_submodule(str(node.target))
            name = self.choices.get(info.point, point.names[point.chosen()])
            if name not in point.names:
                raise DuccioError(f"choice point '{info.point}' has no alternative {name!r}", where="choice-export",
                                  fix=f"use one of: {', '.join(point.names)}")
            alt = getattr(point, name)
            _keep_other_uses(gm, info.point, None if isinstance(alt, nn.Identity) else name, attrs)
            if isinstance(alt, nn.Identity):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
            else:
                gm.add_submodule(info.point, nn.Sequential(OrderedDict([(name, alt)])))
                del node.meta[CHOICE_KEY]
            changed = True
        gm.delete_all_unused_submodules()
        gm.recompile()
        return changed


def _keep_other_uses(gm: GraphModule, point: str, chosen: str | None, attrs: list[Node]) -> None:
    """Move each tensor of the point that a get_attr reads, outside the `chosen` alternative, to an attribute of
    `gm` itself (a parameter stays a parameter, a buffer a buffer), and point the get_attr at it."""
    keep = f"{point}.{chosen}." if chosen is not None else None
    for use in attrs:
        target = str(use.target)
        if not target.startswith(point + ".") or (keep is not None and target.startswith(keep)):
            continue
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        value = getattr(owner, leaf)
        name = base = target.replace(".", "_")
        k = 0
        while hasattr(gm, name):
            k += 1
            name = f"{base}_{k}"
        if isinstance(value, nn.Parameter):
            gm.register_parameter(name, value)
        elif isinstance(value, torch.Tensor) and leaf in owner._buffers:
            gm.register_buffer(name, value, persistent=leaf not in owner._non_persistent_buffers_set)
        else:
            setattr(gm, name, value)
        use.target = name
