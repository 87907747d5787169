"""precision-export: fix every quantised layer at its chosen widths and remove the search machinery.

Each quantised module gets its weight width as `duccio_weight_bits` and its output width as
`duccio_act_bits` (`duccio_fx.ir.precision`: the costs, the fine-tuning and the lowering read them there);
the layers lose their `precision` argument, the banks and their selects go, and each activation quantizer
stays at its layer's width (fine-tuning trains under it; `bake_precision` removes it after). Runs before
shrink-export, which turns the masked twins back into plain modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from torch.fx import GraphModule

from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import ACT_BITS, WEIGHT_BITS
from duccio_fx.search.masks import WIDTHS
from duccio_fx.search.precision import ACT_BANK, ACT_QUANT, ACT_SELECT, BANK, SELECT


@dataclass
class PrecisionExport(Pass):
    """`choice`: module name → weight bits, `act_choice`: → output bits (what `PrecisionBank.choice()` gives)."""

    choice: Mapping[str, int]
    act_choice: Mapping[str, int] = field(default_factory=dict)
    name = "precision-export"
    requires = ("precision-insertion",)

    def run(self, gm: GraphModule) -> bool:
        dead = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            if node.target in (BANK, ACT_BANK) or str(node.target).startswith((SELECT + ".", ACT_SELECT + ".")):
                dead.append(node)
            elif str(node.target).startswith(ACT_QUANT + "."):
                quant = gm.get_submodule(str(node.target))
                quant.bits = int(self.act_choice[quant.layer])
                setattr(gm.get_submodule(quant.layer), ACT_BITS, quant.bits)
                node.kwargs = {}
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
        for name in (BANK, SELECT, ACT_BANK, ACT_SELECT):
            if hasattr(gm, name):
                delattr(gm, name)
        gm.recompile()
        return True
