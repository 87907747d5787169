"""precision-insertion: give every quantisable conv/linear layer a searchable weight precision.

Adds a `duccio_precision` PrecisionBank (one θ row per layer, computed once per forward pass) and hands each
quantised layer its row of g (`MaskedConv2d(x, in_mask, precision=g_row)`: the layer becomes its masked
twin if mask-insertion has not made it one). A module called twice shares one row. Layers left at the
target's width, with the reason: the head (its int32 output is not requantized, so its weights take one
scale for the whole layer; DORY's int32 linear kernels are 8-bit), grouped convs (frozen), opaque ops and
modules other than Conv1d/Conv2d/Linear, and, for depthwise convs, 2 bits (DORY packs 2-bit depthwise weights in
channel pairs, pulp-nn-mixed's kernel reads them in fours: they take 8 or 4 bits).

pulp-nn-mixed reads each output channel's weights from a whole byte and DORY adds no padding, so a layer's
input channels x kernel must be a multiple of 8/bits. The lowering pads channels it computes; the model's
input it cannot, so a layer reading the input only takes the widths its seed shape packs (often 8 bits
alone: 1 or 3 channels x 3x3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.costs.terms import width
from duccio_fx.ir.meta import GROUPS_KEY, layer_term
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import QUANTIZABLE
from duccio_fx.search.masks import MASKED, PLAIN, WIDTHS, as_masked
from duccio_fx.search.precision import BANK, SELECT, PrecisionBank, PrecisionSelect


@dataclass
class PrecisionInsertion(Pass):
    """`widths`: the weight widths searched, widest first. Result: `gm.duccio_precision` and `excluded`
    (layer → why its width is not searched)."""

    widths: tuple[int, ...]
    excluded: dict[str, str] = field(default_factory=dict)
    name = "precision-insertion"
    requires = ("shape-propagation", "channel-analysis")

    def run(self, gm: GraphModule) -> bool:
        rows: dict[str, int] = {}
        allowed: dict[str, tuple[bool, ...]] = {}
        users: list[tuple[Node, str]] = []
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        from_input = {g.id for g in gm.meta[GROUPS_KEY] if set(g.producers) & inputs}
        for node in gm.graph.nodes:
            term = layer_term(node)
            if term is None:
                continue
            target = str(node.target) if node.op == "call_module" else node.name
            reason = self._reason(gm, node, term.kind, term.requant)
            ok = tuple(b >= 4 or term.kind != "depthwise" for b in self.widths)
            if not reason and any(group in from_input for group, *_ in term.in_spec):
                per_channel = width(term.in_spec) * term.kernel // max(term.groups, 1)
                ok = tuple(y and per_channel % (8 // b) == 0 for b, y in zip(self.widths, ok))
                if sum(ok) < 2:
                    reason = (f"it reads the model's input: {per_channel} weights per output channel pack into whole "
                              f"bytes only at {', '.join(str(b) for b, y in zip(self.widths, ok) if y) or 'no'} "
                              "of the widths, and the input's channels cannot be padded")
            if not reason and sum(ok) < 2:
                reason = "depthwise: its kernels take 8 or 4 bits, and 4 is not among the widths"
            if reason:
                self.excluded.setdefault(target, reason)
                continue
            rows.setdefault(target, len(rows))
            allowed[target] = ok
            users.append((node, target))
        if not rows:
            return False
        bank = PrecisionBank(list(rows), self.widths, [allowed[name] for name in rows])
        gm.add_submodule(BANK, bank)
        gm.add_submodule(SELECT, nn.ModuleDict())
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            g = gm.graph.call_module(BANK)
        selects: dict[str, Node] = {}
        last = g
        for node, target in users:
            module = as_masked(gm.get_submodule(target))
            setattr(module, WIDTHS, self.widths)
            key = target.replace(".", "_")
            if key not in selects:
                gm.get_submodule(SELECT)[key] = PrecisionSelect(rows[target])
                with gm.graph.inserting_after(last):
                    selects[key] = last = gm.graph.call_module(f"{SELECT}.{key}", (g,))
            node.kwargs = {**node.kwargs, "precision": selects[key]}
        return True

    @staticmethod
    def _reason(gm: GraphModule, node: Node, kind: str, requant: bool) -> str:
        if node.op != "call_module":
            return "an opaque op: its weights are not a conv/linear module's"
        module = gm.get_submodule(str(node.target))
        plain = PLAIN.get(type(module), type(module))
        if plain not in QUANTIZABLE or plain not in MASKED:
            return f"a {type(module).__name__}: the mixed-precision kernels run Conv1d/Conv2d/Linear"
        if kind == "grouped":
            return "a grouped conv (frozen)"
        if not requant:
            return "the head: its int32 output is not requantized, so it stays at the target's width"
        return ""
