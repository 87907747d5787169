"""mask-insertion: turn an analysed graph into a searchable one (one α vector per searchable group).

Adds a `duccio_masks` MaskBank, computes all masks once per forward, and gives every conv/linear that
reads searchable channels the mask of its input channels (`MaskedConv2d(x, in_mask)`), marking that node
with a `MaskUse`. Groups whose consumers cannot be masked (e.g. ConvTranspose, a user subclass) are left
out of the search, with a reason; so are groups of at most one block with `channel_multiple` N > 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.channels import ChannelGroup
from duccio_fx.ir.meta import GROUPS_KEY, ChannelLayout, MaskUse, channel_layout, op_role, set_mask_use, spec_of
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.search.masks import MASKED, MaskBank, MaskSelect, as_masked, bank_spec

BANK = "duccio_masks"
SELECT = "duccio_mask_select"


def reads_channels(gm: GraphModule, node: Node) -> ChannelLayout | None:
    """Input layout of a module that mixes channels (a conv with groups=1 or a linear), else None."""
    if node.op != "call_module" or op_role(node) is None or op_role(node).role != "defines":
        return None
    src = node.args[0] if node.args else None
    layout = channel_layout(src) if isinstance(src, Node) else None
    return layout if isinstance(layout, ChannelLayout) else None


@dataclass
class MaskInsertion(Pass):
    """Needs channel-analysis. Result: `gm.duccio_masks` and `excluded` (group id → reason)."""

    threshold: float = 0.5
    # --channel-multiple N: one α per block of N channels; a group of at most N channels (one block, which
    # always stays) is left out of the search, with a reason
    channel_multiple: int = 1
    excluded: dict[int, str] = field(default_factory=dict)
    name = "mask-insertion"
    requires = ("shape-propagation", "channel-analysis")

    def run(self, gm: GraphModule) -> bool:
        groups: tuple[ChannelGroup, ...] = gm.meta[GROUPS_KEY]
        searchable = {g.id for g in groups if not g.frozen}
        consumers = [(n, lay) for n in gm.graph.nodes if (lay := reads_channels(gm, n)) is not None]
        for node, layout in consumers:
            module = gm.get_submodule(str(node.target))
            if type(module) not in MASKED:
                for gid in set(layout.groups) & searchable:
                    self.excluded[gid] = (f"its channels feed {type(module).__name__} '{node.target}', which the "
                                          f"mask search cannot resize (supported: Conv1d/2d/3d, Linear)")
        n = self.channel_multiple
        if n > 1:
            for g in groups:
                if g.id in searchable and g.id not in self.excluded and g.channels <= n:
                    self.excluded[g.id] = (
                        f"{g.channels} channels: {'narrower than' if g.channels < n else 'exactly'} one block of "
                        f"--channel-multiple {n}, which always stays, so it keeps all {g.channels}")
        ids = [g.id for g in groups if g.id in searchable and g.id not in self.excluded]
        if not ids:
            return False
        bank_index = {gid: i for i, gid in enumerate(ids)}
        bank = MaskBank(ids, [groups[g].channels for g in ids], self.threshold, block=n)
        gm.add_submodule(BANK, bank)
        gm.add_submodule(SELECT, nn.ModuleDict())
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            masks = gm.graph.call_module(BANK)
        for node, layout in consumers:
            used = tuple(g for g in layout.groups if g in bank_index)
            if not used:
                continue
            module: nn.Module = gm.get_submodule(str(node.target))
            as_masked(module)
            spec = bank_spec(spec_of(layout, 0), bank_index)
            gm.get_submodule(SELECT)[node.name] = MaskSelect(spec, bank.offsets(), always_on=sum(bank.sizes))
            with gm.graph.inserting_before(node):
                in_mask = gm.graph.call_module(f"{SELECT}.{node.name}", (masks,))
            node.args = (node.args[0], in_mask) + tuple(node.args[1:])
            set_mask_use(node, MaskUse(used))
        return True
