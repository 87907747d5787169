"""Quantization-aware fine-tuning for the DORY lowering: fake quantization on the calibrated float graph.

After `calibrate` has fixed every activation's type and scale, `insert_fake_quant` makes the float graph
compute what the integer network will, up to the requantization rounding: every calibrated activation is
rounded and clipped to its grid, and every conv/linear weight to its grid (int8, or the layer's own
`duccio_weight_bits`; per output channel, one scale for the int32 head, as `integerize` does). Gradients pass straight through the rounding. The user's training
loop fine-tunes the weights under that noise; `remove` then restores the plain graph with the trained weights,
which `integerize` quantizes exactly as the fake quantization did.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.nn.utils import parametrize

from duccio_fx.ir.meta import QuantSpec, dory_part, quant_spec
from duccio_fx.ir.precision import fake_quant_weight, round_ste, weight_bits_of

PREFIX = "duccio_fake_quant_"


class FakeQuant(nn.Module):
    """`clip(round(x / scale)) * scale` with a straight-through gradient."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.scale = spec.scale
        self.lo = -(1 << (spec.bits - 1)) if spec.signed else 0
        self.hi = (1 << (spec.bits - 1)) - 1 if spec.signed else (1 << spec.bits) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(round_ste(x / self.scale), self.lo, self.hi) * self.scale


class WeightFakeQuant(nn.Module):
    """Symmetric weights at `bits`, one scale per output channel (or one for the whole layer)."""

    def __init__(self, bits: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.bits, self.per_channel)


def insert_fake_quant(gm: GraphModule, heads: set[int], weight_bits: int = 8) -> Callable[[], None]:
    """Fake-quantize the calibrated graph in place; returns the function that removes it again."""
    inserted: list[Node] = []
    for node in list(gm.graph.nodes):
        spec = quant_spec(node)
        if spec is None:
            continue
        name = PREFIX + node.name
        gm.add_submodule(name, FakeQuant(spec))
        with gm.graph.inserting_after(node):
            fake = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(fake, delete_user_cb=lambda user, fake=fake: user is not fake)
        inserted.append(fake)
    weighted: list[nn.Module] = []
    for node in gm.graph.nodes:
        part = dory_part(node)
        if part is not None and part.kind in ("conv", "linear") and node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            bits = weight_bits_of(module) or weight_bits  # a layer's own precision (mixed precision)
            parametrize.register_parametrization(module, "weight",
                                                 WeightFakeQuant(bits, per_channel=part.layer not in heads))
            weighted.append(module)
    gm.recompile()

    def remove() -> None:
        for fake in inserted:
            fake.replace_all_uses_with(fake.args[0])
            gm.graph.erase_node(fake)
            delattr(gm, str(fake.target))
        for module in weighted:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        gm.recompile()

    return remove
