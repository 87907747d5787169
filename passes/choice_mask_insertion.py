"""choice-mask-insertion: give each choice point of a masked supernet the mask of its input channels.

mask-insertion masks the layers of the graph that read searchable channels; the layers inside a choice
point's alternatives are not nodes of the graph, so this pass adds, per point whose input holds searched
channels, one `MaskSelect` node for the input's channels and passes it to the point, which hands it to the
parts choice-channels named (`mask_readers`, made masked twins). Removing a channel of the input then removes
it from every alternative, exactly as the mask method removes it from a conv.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import channel_layout, choice_info, spec_of
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.passes.mask_insertion import BANK, SELECT
from duccio_fx.search.masks import MaskBank, MaskSelect, as_masked, bank_spec


@dataclass
class ChoiceMaskInsertion(Pass):
    name = "choice-mask-insertion"
    requires = ("choice-channels", "mask-insertion")

    def run(self, gm: GraphModule) -> bool:
        bank: MaskBank | None = getattr(gm, BANK, None)
        if bank is None:
            return False
        index = {gid: i for i, gid in enumerate(bank.group_ids)}
        masks = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == BANK)
        changed = False
        for node in [n for n in gm.graph.nodes if choice_info(n) is not None]:
            point = gm.get_submodule(str(node.target))
            source = node.args[0]
            spec_in = spec_of(channel_layout(source), 0) if isinstance(source, Node) else ()
            if not any(g in index for g, *_ in spec_in) or not any(point.mask_readers.values()):
                continue
            for name, parts in point.mask_readers.items():
                for part in parts:
                    as_masked(getattr(getattr(point, name), part))
            gm.get_submodule(SELECT)[node.name] = MaskSelect(bank_spec(spec_in, index), bank.offsets(),
                                                            always_on=sum(bank.sizes))
            with gm.graph.inserting_before(node):
                in_mask = gm.graph.call_module(f"{SELECT}.{node.name}", (masks,))
            node.args = (node.args[0], in_mask)
            changed = True
        return changed
