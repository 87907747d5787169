"""choice-export: lower a path-method supernet to a plain model holding only the chosen alternatives.

Each choice point becomes `nn.Sequential(<alternative name>=<its module>)` under the point's name, so the
exported layers are named `<point>.<alternative>.<layer>`, exactly as the search's cost tables name them;
a chosen `nn.Identity` removes the node. The modules are the searched ones (weights, BatchNorm statistics),
so the exported model computes what the search model computes in evaluation mode.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

from torch import nn
from torch.fx import GraphModule

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
