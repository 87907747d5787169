"""Precision search: one choice of bit width per conv/linear layer for its weights (and one for its output),
searched like the path method's choice points (Gumbel-softmax, hard one-hot forward, soft gradient backward).

    sm = duccio_fx.make_searchable(model, x, bits=(2, 4, 8), act_bits=(2, 4, 8))  # channels=False: widths only

`PrecisionBank` holds θ, one row per quantised layer and one column per width (widest first), and is
called once per forward pass: in training (with θ trainable) it draws every layer's g, else it gives the
argmax (ties: the widest, so an untrained bank runs the seed at the target's width). A quantised layer
(`MaskedConv2d(x, in_mask, precision=g_row)`) then uses the weights `Σ_i g_i · Q_{b_i}(W)`: with a hard
one-hot g that is `Q_b(W)` for the sampled b forward, while θ gets `⟨∂L/∂W_q, Q_{b_i}(W)⟩` for every width
(`Q_b`: `duccio_fx.ir.precision.fake_quant_weight`, the grid the lowering integerizes to). The costs read the
same g (paper eq. 8): each layer's weight bits are `g · widths`, exact forward, differentiable backward.

Output widths work alike with a second bank: an `ActQuant` (PACT) on each layer's requantized output computes
`Σ_i g_i · Q_{b_i}(clip(x, α))`, and the costs take each layer's output width and the width of the layer its
input comes from. `bake_precision` turns an exported model into plain modules.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.precision import ACT_CLIP, bake_weight_bits, check_bits, fake_quant_weight, round_ste

class WidthRules:
    """Which widths each layer may take: a default set, then `PATTERN=widths` rules on module names (fnmatch;
    the last match wins), as `--alternatives` does for the path method: `["2,4,8", "stage3.*=4,8",
    "fc1=8"]`, or plain widths `(2, 4, 8)`. A rule with one width fixes its layers at it."""

    def __init__(self, specs: Sequence[int] | Sequence[str] | str, where: str = "bits") -> None:
        items = [specs] if isinstance(specs, str) else list(specs)
        self.where = where
        self.default: tuple[int, ...] | None = None
        self.rules: list[tuple[str, tuple[int, ...]]] = []
        self.matched: set[str] = set()
        plain = [x for x in items if not isinstance(x, str)]
        if plain:
            self.default = check_bits(plain, where)
        for text in (x for x in items if isinstance(x, str)):
            pattern, _, widths = text.rpartition("=") if "=" in text else (None, "", text)
            if pattern is not None and not pattern.strip():
                raise DuccioError(f"empty layer pattern in {text!r}", where=where,
                                  fix="write PATTERN=WIDTHS, e.g. 'stage3.*=4,8'")
            try:
                parsed = check_bits([int(b) for b in widths.split(",") if b.strip()], where)
            except ValueError:
                raise DuccioError(f"{text!r} is not a list of whole numbers", where=where, fix="e.g. 2,4,8 or "
                                  "'stage3.*=4,8'") from None
            if pattern is None:
                self.default = parsed
            else:
                self.rules.append((pattern.strip(), parsed))
        if self.default is None:
            raise DuccioError(f"no default widths among {items!r}", where=where,
                              fix="give the widths of every layer first, e.g. 2,4,8, then PATTERN=WIDTHS rules")

    @property
    def widths(self) -> tuple[int, ...]:
        """Every width some layer may take, widest first (the bank's columns)."""
        every = set(self.default or ()) | {b for _, ws in self.rules for b in ws}
        return tuple(sorted(every, reverse=True))

    def for_layer(self, name: str) -> tuple[int, ...]:
        chosen = self.default or ()
        for pattern, widths in self.rules:
            if fnmatch.fnmatchcase(name, pattern):
                self.matched.add(pattern)
                chosen = widths
        return chosen

    def check_matched(self, layers: Sequence[str]) -> None:
        """Refuses a rule that matched no searched layer (a typo would silently change nothing)."""
        for pattern, _ in self.rules:
            if pattern not in self.matched:
                raise DuccioError(f"the pattern {pattern!r} matches no layer whose width is searched", where=self.where,
                                  fix=f"match some of: {', '.join(layers) or '(none)'} (fnmatch, e.g. 'stage3.*')")


BANK = "duccio_precision"  # the bank's name in a searchable graph
SELECT = "duccio_precision_select"  # where the per-layer selects live


class PrecisionBank(nn.Module):
    """θ of every quantised layer's weight precision: [layers, widths], widths widest first."""

    def __init__(self, layers: Sequence[str], widths: Sequence[int],
                 allowed: Sequence[Sequence[bool]] | None = None, notes: Sequence[str] | None = None) -> None:
        super().__init__()
        self.layers = list(layers)
        self.notes = list(notes) if notes is not None else [""] * len(self.layers)  # why a layer lacks a width
        self.widths = tuple(int(b) for b in widths)
        self.theta = nn.Parameter(torch.zeros(len(self.layers), len(self.widths)))
        # widths a layer may not take (its weights would not pack into whole bytes per output channel)
        rule = torch.tensor([list(a) for a in allowed], dtype=torch.bool) if allowed is not None else \
            torch.ones(len(self.layers), len(self.widths), dtype=torch.bool)
        self.register_buffer("barred", ~rule, persistent=False)
        self.register_buffer("bits", torch.tensor(self.widths, dtype=torch.float64), persistent=False)
        self.temperature = 1.0
        self.sample: torch.Tensor | None = None  # the g of the last forward pass
        self._noise: torch.Tensor | None = None  # its Gumbel noise (None: it was the argmax)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sample"] = None  # a tensor in the autograd graph cannot be copied or pickled
        state["_noise"] = None
        return state

    def logits(self) -> torch.Tensor:
        """θ with the widths a layer may not take at -inf."""
        return self.theta.masked_fill(self.barred, -torch.inf)

    def draw(self) -> torch.Tensor:
        """New Gumbel noise; the hard one-hot g per layer it selects (Gumbel-max), with the gradient of the
        Gumbel-softmax at the temperature."""
        self._noise = -torch.empty_like(self.theta.detach()).exponential_().log()
        return self._relaxed()

    def _relaxed(self) -> torch.Tensor:
        """g of the last draw's noise, built anew from θ: every call has its own autograd graph, so the costs
        may be evaluated (and differentiated) any number of times for one forward pass."""
        soft = torch.softmax((self.logits() + self._noise) / self.temperature, dim=1)
        hard = torch.zeros_like(soft).scatter_(1, soft.detach().argmax(1, keepdim=True), 1.0)
        return hard - soft.detach() + soft

    def chosen(self) -> torch.Tensor:
        """The one-hot of every layer's argmax θ (ties: the widest)."""
        theta = self.logits().detach()
        return torch.zeros_like(theta).scatter_(1, theta.argmax(1, keepdim=True), 1.0)

    def forward(self) -> torch.Tensor:
        sampling = self.training and self.theta.requires_grad
        self.sample = self.draw() if sampling else self.chosen()
        if not sampling:
            self._noise = None
        return self.sample

    def current(self, chosen: bool = False) -> torch.Tensor:
        """The g the last forward pass used (the argmax before any, or with `chosen`)."""
        if chosen or self.sample is None:
            return self.chosen()
        return self._relaxed() if getattr(self, "_noise", None) is not None else self.sample

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


ACT_BANK = "duccio_act_precision"  # the activation widths' bank
ACT_SELECT = "duccio_act_precision_select"
ACT_QUANT = "duccio_act_quant"  # where the activation quantizers live


class ActQuant(nn.Module):
    """PACT-style fake quantization of a layer's output: clip to [0, α] (signed: [-α, α]) with a learned α,
    then round to the grid of `bits` (or `Σ_i g_i · Q_{b_i}` over the widths a search's g selects), with
    straight-through rounding; α gets the gradient of the clipped values and of the step α/levels (as LSQ).
    α starts at the 99.99th percentile of the first training batch's values (all ranks agree on the
    largest), so it starts where calibration would put the range."""

    def __init__(self, widths: Sequence[int], signed: bool, bits: int | None = None, layer: str = "") -> None:
        super().__init__()
        self.widths = tuple(int(b) for b in widths)
        self.signed = bool(signed)
        self.bits = bits  # a fixed width (exported, fine-tuning) instead of a g
        self.layer = layer  # the conv/linear module whose output it quantizes
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self._ready = False

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = True  # a loaded α is a trained one

    def _start(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            flat = x.detach().reshape(-1).float()
            values = flat.abs() if self.signed else flat.clamp(min=0)
            if values.numel() > 1 << 16:
                values = values[torch.randint(values.numel(), (1 << 16,), device=values.device)]
            top = torch.quantile(values, 0.9999).clamp(min=1e-3)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
            self.alpha.copy_(top.to(self.alpha.dtype))
        self._ready = True

    def quantize(self, x: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
        levels = (1 << (bits - 1)) - 1 if self.signed else (1 << bits) - 1
        step = alpha / levels
        return round_ste(x / step) * step

    def forward(self, x: torch.Tensor, precision: torch.Tensor | None = None) -> torch.Tensor:
        if not self._ready and self.training:
            self._start(x)
        alpha = self.alpha.abs() + 1e-8
        y = torch.minimum(x, alpha)
        y = torch.maximum(y, -alpha) if self.signed else torch.relu(y)
        if precision is None:
            return self.quantize(y, self.bits or max(self.widths), alpha)
        out = y.new_zeros(())
        for i, bits in enumerate(self.widths):
            out = out + precision[i].to(y.dtype) * self.quantize(y, bits, alpha)
        return out

    def extra_repr(self) -> str:
        return f"widths={self.widths}, signed={self.signed}" + (f", bits={self.bits}" if self.bits else "")


def bake_precision(model: nn.Module) -> None:
    """The exported model as plain modules: weights rounded onto their grids (`bake_weight_bits`), and the
    activation quantizers of a graph removed, each leaving its learned range on its layer (`duccio_act_clip`,
    which calibration then uses) so the integer network keeps the range the model was fine-tuned with."""
    bake_weight_bits(model)
    if not isinstance(model, GraphModule) or not hasattr(model, ACT_QUANT):
        return
    for node in list(model.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(ACT_QUANT + "."):
            quant = model.get_submodule(str(node.target))
            setattr(model.get_submodule(quant.layer), ACT_CLIP, float(quant.alpha.detach().abs()))
            node.replace_all_uses_with(node.args[0])
            model.graph.erase_node(node)
    delattr(model, ACT_QUANT)
    model.recompile()
