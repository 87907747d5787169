"""precision-export: fix every quantised layer at its chosen weight width and remove the search machinery.

Each quantised module gets its width as `duccio_weight_bits` (`duccio_fx.ir.precision`: the costs, the
fine-tuning and the lowering read it there) and loses its `precision` argument; the bank and its selects
go. Runs before shrink-export, which turns the masked twins back into plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch.fx import GraphModule

from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import WEIGHT_BITS
from duccio_fx.search.masks import WIDTHS
from duccio_fx.search.precision import BANK, SELECT


@dataclass
class PrecisionExport(Pass):
    """`choice`: module name → weight bits (what `PrecisionBank.choice()` gives)."""

    choice: Mapping[str, int]
    name = "precision-export"
    requires = ("precision-insertion",)

    def run(self, gm: GraphModule) -> bool:
        dead = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            if node.target == BANK or str(node.target).startswith(SELECT + "."):
                dead.append(node)
            elif "precision" in node.kwargs:
                node.kwargs = {k: v for k, v in node.kwargs.items() if k != "precision"}
                module = gm.get_submodule(str(node.target))
                setattr(module, WEIGHT_BITS, int(self.choice[str(node.target)]))
                if hasattr(module, WIDTHS):
                    delattr(module, WIDTHS)
        if not dead:
            return False
        for node in reversed(dead):
            gm.graph.erase_node(node)
        for name in (BANK, SELECT):
            if hasattr(gm, name):
                delattr(gm, name)
        gm.recompile()
        return True
