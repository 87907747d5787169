"""Weight-precision search: one choice of bit width per conv/linear layer, searched like the path method's
choice points (Gumbel-softmax, hard one-hot forward, soft gradient backward).

    sm = duccio_fx.make_searchable(model, x, bits=(2, 4, 8))     # masks and precisions; channels=False: bits only

`PrecisionBank` holds θ, one row per quantised layer and one column per width (widest first), and is
called once per forward pass: in training (with θ trainable) it draws every layer's g, else it gives the
argmax (ties: the widest, so an untrained bank runs the seed at the target's width). A quantised layer
(`MaskedConv2d(x, in_mask, precision=g_row)`) then uses the weights `Σ_i g_i · Q_{b_i}(W)`: with a hard
one-hot g that is `Q_b(W)` for the sampled b forward, while θ gets `⟨∂L/∂W_q, Q_{b_i}(W)⟩` for every width
(`Q_b`: `duccio_fx.ir.precision.fake_quant_weight`, the grid the lowering integerizes to). The costs read the
same g (paper eq. 8): each layer's weight bits are `g · widths`, exact forward, differentiable backward.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from duccio_fx.ir.precision import fake_quant_weight

BANK = "duccio_precision"  # the bank's name in a searchable graph
SELECT = "duccio_precision_select"  # where the per-layer selects live


class PrecisionBank(nn.Module):
    """θ of every quantised layer's weight precision: [layers, widths], widths widest first."""

    def __init__(self, layers: Sequence[str], widths: Sequence[int],
                 allowed: Sequence[Sequence[bool]] | None = None) -> None:
        super().__init__()
        self.layers = list(layers)
        self.widths = tuple(int(b) for b in widths)
        self.theta = nn.Parameter(torch.zeros(len(self.layers), len(self.widths)))
        # widths a layer may not take (its weights would not pack into whole bytes per output channel)
        rule = torch.tensor([list(a) for a in allowed], dtype=torch.bool) if allowed is not None else \
            torch.ones(len(self.layers), len(self.widths), dtype=torch.bool)
        self.register_buffer("barred", ~rule, persistent=False)
        self.register_buffer("bits", torch.tensor(self.widths, dtype=torch.float64), persistent=False)
        self.temperature = 1.0
        self.sample: torch.Tensor | None = None  # the g of the last forward pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sample"] = None  # a tensor in the autograd graph cannot be copied or pickled
        return state

    def logits(self) -> torch.Tensor:
        """θ with the widths a layer may not take at -inf."""
        return self.theta.masked_fill(self.barred, -torch.inf)

    def draw(self) -> torch.Tensor:
        """Hard one-hot g per layer (Gumbel-max), with the gradient of the Gumbel-softmax at the temperature."""
        theta = self.logits()
        gumbels = -torch.empty_like(theta).exponential_().log()
        soft = torch.softmax((theta + gumbels) / self.temperature, dim=1)
        hard = torch.zeros_like(soft).scatter_(1, soft.detach().argmax(1, keepdim=True), 1.0)
        return hard - soft.detach() + soft

    def chosen(self) -> torch.Tensor:
        """The one-hot of every layer's argmax θ (ties: the widest)."""
        theta = self.logits().detach()
        return torch.zeros_like(theta).scatter_(1, theta.argmax(1, keepdim=True), 1.0)

    def forward(self) -> torch.Tensor:
        sampling = self.training and self.theta.requires_grad
        self.sample = self.draw() if sampling else self.chosen()
        return self.sample

    def current(self, chosen: bool = False) -> torch.Tensor:
        """The g the last forward pass used (the argmax before any, or with `chosen`)."""
        return self.chosen() if chosen or self.sample is None else self.sample

    def layer_bits(self, chosen: bool = False) -> torch.Tensor:
        """Every quantised layer's weight bits, `g · widths` (float64, differentiable w.r.t. θ)."""
        return self.current(chosen).to(torch.float64) @ self.bits

    def choice(self) -> dict[str, int]:
        """The argmax width of every quantised layer, by module name."""
        index = self.logits().detach().argmax(1).tolist()
        return {name: self.widths[i] for name, i in zip(self.layers, index)}

    def extra_repr(self) -> str:
        return f"widths={self.widths}, layers={len(self.layers)}"


class PrecisionSelect(nn.Module):
    """Picks one layer's row of the bank's g (a module, so the graph keeps it as one node through pickling)."""

    def __init__(self, row: int) -> None:
        super().__init__()
        self.row = row

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return g[self.row]

    def extra_repr(self) -> str:
        return f"row={self.row}"


def mixed_weight(w: torch.Tensor, g: torch.Tensor, widths: Sequence[int]) -> torch.Tensor:
    """`Σ_i g_i · Q_{b_i}(w)`: the weights at the width g selects (every width computed: no host sync)."""
    out = w.new_zeros(())
    for i, bits in enumerate(widths):
        out = out + g[i].to(w.dtype) * fake_quant_weight(w, bits)
    return out
