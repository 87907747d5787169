"""Per-layer precision: the bit width a conv/linear layer's weights are stored at, and its output's.

A layer's precision is an attribute of its module (`duccio_weight_bits`), so it travels with the module
through `deepcopy`, pickling, the shrinking export and batch-norm folding, and every side reads it from one
place: the cost terms (bytes, DMA, kernel cycles at that width), the lowering (the integer weights and the
Quantlab `weight_bits`), and quantization-aware fine-tuning. A module without it runs at its target's
`[bits] weights`.

A layer's output precision (`duccio_act_bits`, the requantized activation DORY writes; 8 when absent) and
optionally its learned clipping range (`duccio_act_clip`, PACT's α: the largest magnitude the integers
represent) are attributes of the same module; calibration uses that range instead of a percentile.

Quantization (the same grid everywhere: the search's fake quantization, fine-tuning, the lowering's
integerization): symmetric, one scale per output channel, `scale = max|w| / qmax`, integers in
[-qmax, qmax] with qmax = 2^(bits-1) - 1 (8 bits: ±127, 4 bits: ±7, 2 bits: ternary {-1, 0, 1}). A channel
scaled by a constant (batch-norm folding) keeps its integers, so quantizing before or after folding agrees.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from duccio_fx.common.errors import DuccioError

WEIGHT_BITS = "duccio_weight_bits"
ACT_BITS = "duccio_act_bits"
ACT_CLIP = "duccio_act_clip"
SUPPORTED_BITS = (2, 4, 8)  # what pulp-nn-mixed's kernels take for weights
QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def weight_bits_of(module: nn.Module) -> int | None:
    """The bit width set on `module`'s weights (None: the target's)."""
    bits = getattr(module, WEIGHT_BITS, None)
    return int(bits) if bits is not None else None


def act_bits_of(module: nn.Module) -> int | None:
    """The bit width set on `module`'s requantized output (None: the target's)."""
    bits = getattr(module, ACT_BITS, None)
    return int(bits) if bits is not None else None


def act_clip_of(module: nn.Module) -> float | None:
    """The learned clipping range of `module`'s output (None: calibrate it)."""
    clip = getattr(module, ACT_CLIP, None)
    return float(clip) if clip is not None else None


def check_bits(bits: Iterable[int], where: str) -> tuple[int, ...]:
    """Bit widths as a tuple, widest first; refuses widths the kernels do not run."""
    out = []
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int) or b not in SUPPORTED_BITS:
            raise DuccioError(f"{b!r} is not a bit width the deployment kernels run", where=where,
                              fix=f"use some of {', '.join(map(str, SUPPORTED_BITS))} (pulp-nn-mixed)")
        out.append(int(b))
    if not out:
        raise DuccioError("no bit width given", where=where, fix="e.g. 2,4,8")
    return tuple(sorted(set(out), reverse=True))


def set_weight_bits(model: nn.Module, bits: Mapping[str, int] | int) -> None:
    """Set the weight precision of `model`'s conv/linear modules: one width for all, or {qualified name:
    bits}. Unknown names and widths the kernels do not run are refused."""
    _set(model, bits, WEIGHT_BITS, "set_weight_bits")


def set_act_bits(model: nn.Module, bits: Mapping[str, int] | int) -> None:
    """Set the output precision of `model`'s conv/linear modules (the activation after them, requantized):
    one width for all, or {qualified name: bits}."""
    _set(model, bits, ACT_BITS, "set_act_bits")


def _set(model: nn.Module, bits: Mapping[str, int] | int, attribute: str, where: str) -> None:
    modules = dict(model.named_modules())
    items = ({name: bits for name, m in modules.items() if isinstance(m, QUANTIZABLE)}
             if isinstance(bits, int) else dict(bits))
    for name, b in items.items():
        module = modules.get(name)
        if not isinstance(module, QUANTIZABLE):
            raise DuccioError(f"{name!r} is not a conv/linear module of the model", where=where,
                              fix="name a Conv1d/Conv2d/Linear by its qualified name (model.named_modules())")
        setattr(module, attribute, check_bits([b], f"{where}: {name}")[0])


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """The quantization step of `w` at `bits` (per output channel, shaped to broadcast; no gradient)."""
    qmax = (1 << (bits - 1)) - 1
    flat = w.detach().reshape(w.shape[0], -1).abs()
    top = flat.amax(dim=1) if per_channel else flat.max().expand(w.shape[0])
    scale = torch.where(top > 0, top / qmax, torch.ones_like(top))
    return scale.reshape(-1, *([1] * (w.dim() - 1)))


def fake_quant_weight(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """`w` rounded to its `bits` grid (values stay float), with a straight-through gradient."""
    qmax = (1 << (bits - 1)) - 1
    scale = weight_scale(w, bits, per_channel)
    return torch.clamp(round_ste(w / scale), -qmax, qmax) * scale


class _WeightQuant:
    """Forward of a conv/linear whose weights are fake-quantized at its `duccio_weight_bits` (what
    quantization-aware fine-tuning trains): the same module re-classed, state dict unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.weight, getattr(self, WEIGHT_BITS))
        if isinstance(self, nn.Linear):
            return nn.functional.linear(x, w, self.bias)
        return self._conv_forward(x, w, self.bias)


class QuantConv1d(_WeightQuant, nn.Conv1d):
    pass


class QuantConv2d(_WeightQuant, nn.Conv2d):
    pass


class QuantLinear(_WeightQuant, nn.Linear):
    pass


_QUANT: dict[type, type] = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
_PLAIN: dict[type, type] = {v: k for k, v in _QUANT.items()}


def fake_quantize_weights(model: nn.Module) -> list[str]:
    """Make every module with a weight precision compute with its weights on that grid (straight-through
    gradients), in place, until `bake_weight_bits`; returns their names."""
    done = []
    for name, module in model.named_modules():
        if weight_bits_of(module) is not None and type(module) in _QUANT:
            module.__class__ = _QUANT[type(module)]
            done.append(name)
    return done


def bake_weight_bits(model: nn.Module) -> list[str]:
    """Round every module with a weight precision to its grid, in place, and make it a plain module again:
    the float model then computes what the integer one will, up to activation rounding. Returns the names
    of the modules rounded."""
    done = []
    with torch.no_grad():
        for name, module in model.named_modules():
            bits = weight_bits_of(module)
            if bits is None or not isinstance(module, QUANTIZABLE):
                continue
            module.__class__ = _PLAIN.get(type(module), type(module))
            module.weight.copy_(fake_quant_weight(module.weight, bits))
            done.append(name)
    return done
