"""precision-insertion: give every quantisable conv/linear layer a searchable weight precision and, with
activation widths, a searchable output precision.

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

Activation widths: every conv/linear that requantizes (not the head) gets an `ActQuant` (PACT: a learned
clipping range, then the grid of the width its row of a second bank's g selects) on its requantized output:
after its batch norm and fused activation (ReLU, ReLU6, hardtanh) when each is the only user of the one
before, where DORY's requantization happens. Unsigned after a ReLU-like activation, else signed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.costs.terms import input_producer, width
from duccio_fx.ir.meta import GROUPS_KEY, LAYOUT_KEY, TENSOR_KEY, LayerTerm, layer_term
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import QUANTIZABLE
from duccio_fx.search.masks import MASKED, PLAIN, WIDTHS, as_masked
from duccio_fx.search.precision import (ACT_BANK, ACT_QUANT, ACT_SELECT, BANK, SELECT, ActQuant, PrecisionBank,
                                        PrecisionSelect, WidthRules)


@dataclass
class PrecisionInsertion(Pass):
    """`widths`: the weight widths searched, per layer (None: weights stay at the target's); `act_widths`:
    the activation widths (None: 8 bits). Result: the banks, and `excluded` / `act_excluded` (layer → why its
    width is not searched)."""

    widths: WidthRules | None
    act_widths: WidthRules | None = None
    excluded: dict[str, str] = field(default_factory=dict)
    act_excluded: dict[str, str] = field(default_factory=dict)
    # with activation widths: layer (its cost-term name) → the searched layer whose output it reads
    reads: dict[str, str] = field(default_factory=dict)
    name = "precision-insertion"
    requires = ("shape-propagation", "channel-analysis")

    def run(self, gm: GraphModule) -> bool:
        changed = False
        if self.widths is not None:
            changed |= self._weights(gm, self.widths)
        if self.act_widths is not None:
            changed |= self._activations(gm, self.act_widths)
        return changed

    def _weights(self, gm: GraphModule, rules: WidthRules) -> bool:
        widths = rules.widths
        rows: dict[str, int] = {}
        allowed: dict[str, tuple[bool, ...]] = {}
        notes: dict[str, str] = {}
        users: list[tuple[Node, str]] = []
        inputs = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        from_input = {g.id for g in gm.meta[GROUPS_KEY] if set(g.producers) & inputs}
        for node in gm.graph.nodes:
            term = layer_term(node)
            if term is None:
                continue
            target = str(node.target) if node.op == "call_module" else node.name
            reason = self._reason(gm, node, term.kind, term.requant)
            if not reason:
                mine = rules.for_layer(target)
                reads_input = any(group in from_input for group, *_ in term.in_spec)
                ok, note = _runnable(term, widths, mine, reads_input)
                if sum(ok) == 0 or (sum(ok) == 1 and len(mine) > 1):  # nothing left to search
                    reason = note
            if reason:
                self.excluded.setdefault(target, reason)
                continue
            rows.setdefault(target, len(rows))
            allowed[target], notes[target] = ok, note
            users.append((node, target))
        rules.check_matched(list(rows))
        if not rows:
            return False
        bank = PrecisionBank(list(rows), widths, [allowed[n] for n in rows], [notes[n] for n in rows])
        g, selects = self._bank(gm, BANK, SELECT, bank, rows)
        for node, target in users:
            module = as_masked(gm.get_submodule(target))
            setattr(module, WIDTHS, widths)
            node.kwargs = {**node.kwargs, "precision": selects[target]}
        return True

    def _activations(self, gm: GraphModule, rules: WidthRules) -> bool:
        widths = rules.widths
        rows: dict[str, int] = {}
        allowed: dict[str, tuple[bool, ...]] = {}
        ends: list[tuple[Node, str, bool]] = []
        for node in list(gm.graph.nodes):
            term = layer_term(node)
            if term is None:
                continue
            target = str(node.target) if node.op == "call_module" else node.name
            reason = self._reason(gm, node, term.kind, term.requant)
            if reason:
                self.act_excluded.setdefault(target, reason)
                continue
            end, unsigned = _requant_point(gm, node)
            rows.setdefault(target, len(rows))
            allowed[target] = tuple(b in rules.for_layer(target) for b in widths)
            ends.append((end, target, unsigned))
        rules.check_matched(list(rows))
        if not rows:
            return False
        for node in gm.graph.nodes:
            term = layer_term(node)
            producer = input_producer(gm, node.args[0]) if term is not None and node.args else None
            if producer in rows:
                self.reads[term.name] = producer
        bank = PrecisionBank(list(rows), widths, [allowed[n] for n in rows])
        _, selects = self._bank(gm, ACT_BANK, ACT_SELECT, bank, rows)
        gm.add_submodule(ACT_QUANT, nn.ModuleDict())
        for end, target, unsigned in ends:
            key = end.name
            gm.get_submodule(ACT_QUANT)[key] = ActQuant(widths, signed=not unsigned, layer=target)
            with gm.graph.inserting_after(end):
                quant = gm.graph.call_module(f"{ACT_QUANT}.{key}", (end,), {"precision": selects[target]})
            # elementwise: the same shape and channels as what it quantizes (shrink-export cuts its readers by
            # them); no cost term of its own
            quant.meta.update({k: end.meta[k] for k in (TENSOR_KEY, LAYOUT_KEY) if k in end.meta})
            end.replace_all_uses_with(quant, delete_user_cb=lambda user, quant=quant: user is not quant)
        return True

    @staticmethod
    def _bank(gm: GraphModule, bank_name: str, select_name: str, bank: PrecisionBank,
              rows: dict[str, int]) -> tuple[Node, dict[str, Node]]:
        """Add `bank` (called once per forward pass, first) and one select of its g per layer."""
        gm.add_submodule(bank_name, bank)
        gm.add_submodule(select_name, nn.ModuleDict())
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        with gm.graph.inserting_before(first):
            g = gm.graph.call_module(bank_name)
        selects: dict[str, Node] = {}
        last = g
        for target, row in rows.items():
            key = target.replace(".", "_")
            gm.get_submodule(select_name)[key] = PrecisionSelect(row)
            with gm.graph.inserting_after(last):
                selects[target] = last = gm.graph.call_module(f"{select_name}.{key}", (g,))
        return g, selects

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


def _runnable(term: LayerTerm, widths: tuple[int, ...], mine: tuple[int, ...], reads_input: bool
              ) -> tuple[tuple[bool, ...], str]:
    """Which of the bank's `widths` a layer may take (its own, `mine`, that its kernels run), and why the
    kernels bar any of them."""
    per_channel = width(term.in_spec) * term.kernel // max(term.groups, 1)
    ok, why = [], []
    for b in widths:
        if b not in mine:
            ok.append(False)
        elif term.kind == "depthwise" and b < 4:
            ok.append(False)
            why.append("depthwise: DORY's 2-bit depthwise packing does not match pulp-nn-mixed's kernel "
                       "(8 or 4 bits)")
        elif reads_input and per_channel % (8 // b):
            ok.append(False)
            why.append(f"it reads the model's input: {per_channel} weights per output channel do not pack into "
                       f"whole bytes at {b} bits, and the input's channels cannot be padded")
        else:
            ok.append(True)
    return tuple(ok), "; ".join(why)


_FUSED = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_FUSED_FUNCTIONS = {"relu", "relu6", "relu_"}


def _requant_point(gm: GraphModule, node: Node) -> tuple[Node, bool]:
    """Where DORY requantizes a layer's output: after its batch norm and fused activation, each the only
    user of the one before; and whether the output is unsigned (a ReLU-like activation ends it)."""
    end, unsigned = node, False
    while len(end.users) == 1:
        user = next(iter(end.users))
        if user.op == "call_module":
            module = gm.get_submodule(str(user.target))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not unsigned:
                end = user
                continue
            if isinstance(module, _FUSED) and not unsigned:
                end, unsigned = user, not isinstance(module, nn.Hardtanh) or module.min_val >= 0
                continue
        elif user.op in ("call_function", "call_method") and not unsigned and \
                getattr(user.target, "__name__", str(user.target)) in _FUSED_FUNCTIONS:
            end, unsigned = user, True
            continue
        break
    return end, unsigned
