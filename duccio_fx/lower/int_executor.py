"""The integer reference executor: runs an `IntNet` with exactly DORY's integer arithmetic.

It is the single source of truth for the golden files and for the integer accuracy in the report. It runs
batched on torch tensors (any device): convolutions and sums in float64, which holds every accumulator of an
8-bit network exactly (|acc| < 2^53), then the requantization in int64 with arithmetic shifts, so the
results are exact integers. The arithmetic of each layer kind is documented in `intnet`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from duccio_fx.lower.intnet import (NETWORK_INPUT, Add, Branch, Conv, IntNet, IntType, Linear, Pool, Requant,
                                    pool_multiplier)


def _const(array: np.ndarray, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=dtype, device=like.device)


def _clip(x: torch.Tensor, to: IntType) -> torch.Tensor:
    return x.clamp(to.lo, to.hi)


def requantize(acc: torch.Tensor, requant: Requant) -> torch.Tensor:
    """`clip((acc * mul + add) >> shift)`, per channel (dim 1) or scalar."""
    shape = (1, -1) + (1,) * (acc.dim() - 2) if requant.per_channel else ()
    mul = _const(requant.mul, acc, torch.int64).reshape(shape)
    add = _const(requant.add, acc, torch.int64).reshape(shape)
    return _clip((acc * mul + add) >> requant.shift, requant.out)


def _exact_int(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).to(torch.int64)


def _conv(layer: Conv, x: torch.Tensor) -> torch.Tensor:
    top, left, bottom, right = layer.pads
    x = F.pad(x.to(torch.float64), (left, right, top, bottom))
    weight = _const(layer.weight, x, torch.float64)
    acc = _exact_int(F.conv2d(x, weight, stride=layer.stride, groups=layer.groups))
    if layer.bias is not None:
        acc = acc + _const(layer.bias, acc, torch.int64).reshape(1, -1, 1, 1)
    return requantize(acc, layer.requant)


def _linear(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1).to(torch.float64)  # CHW order, as PyTorch's flatten
    acc = _exact_int(flat @ _const(layer.weight, flat, torch.float64).T)
    if layer.bias is not None:
        acc = acc + _const(layer.bias, acc, torch.int64)
    return acc if layer.requant is None else requantize(acc, layer.requant)


def _branch(x: torch.Tensor, branch: Branch) -> torch.Tensor:
    return _clip((x * branch.mul + branch.add) >> branch.shift, branch.into)


def _add(layer: Add, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    total = _branch(x1, layer.in1) + _branch(x2, layer.in2)
    return _clip((total * layer.out_mul + layer.out_add) >> layer.out_shift, layer.out)


def _pool(layer: Pool, x: torch.Tensor) -> torch.Tensor:
    kernel = tuple(x.shape[2:]) if layer.global_ else layer.kernel
    stride = kernel if layer.global_ else layer.stride
    top, left, bottom, right = (0, 0, 0, 0) if layer.global_ else layer.pads
    if layer.mode == "max":
        padded = F.pad(x.to(torch.float64), (left, right, top, bottom), value=float("-inf"))
        return _exact_int(F.max_pool2d(padded, kernel, stride))
    padded = F.pad(x.to(torch.float64), (left, right, top, bottom))
    total = _exact_int(F.avg_pool2d(padded, kernel, stride, divisor_override=1))
    window = kernel[0] * kernel[1]
    if layer.requant is not None:  # the kernel divides the multiplier by the window first (C integer division)
        rq = layer.requant
        return requantize(total, Requant(pool_multiplier(rq.mul, window), rq.add, rq.shift, rq.out))
    return torch.div(total, window, rounding_mode="floor")


def run(net: IntNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output (int64 tensors, [N, C, H, W] or [N, C]) for the integer input batch `x`
    ([N, C, H, W], values in the network's input type)."""
    if x.dim() == len(net.input_shape):
        x = x.unsqueeze(0)
    x = x.to(torch.int64)
    outputs: list[torch.Tensor] = []

    def value(index: int) -> torch.Tensor:
        return x if index == NETWORK_INPUT else outputs[index]

    for layer in net.layers:
        if isinstance(layer, Conv):
            outputs.append(_conv(layer, value(layer.input)))
        elif isinstance(layer, Linear):
            outputs.append(_linear(layer, value(layer.input)))
        elif isinstance(layer, Add):
            outputs.append(_add(layer, value(layer.inputs[0]), value(layer.inputs[1])))
        elif isinstance(layer, Pool):
            outputs.append(_pool(layer, value(layer.input)))
        else:  # pragma: no cover - the IntLayer union is closed
            raise TypeError(f"unknown integer layer {type(layer).__name__}")
    return outputs


def output_shapes(net: IntNet) -> list[tuple[int, ...]]:
    """Each layer's output shape without the batch dim ((C, H, W) or (C,))."""
    zeros = torch.zeros((1, *net.input_shape), dtype=torch.int64)
    return [tuple(out.shape[1:]) for out in run(net, zeros)]


def quantize_input(net: IntNet, x: torch.Tensor) -> torch.Tensor:
    """A float input batch as the network's integer input: `clip(round(x / scale))`."""
    if net.input_scale is None:
        raise ValueError("this integer network has no input scale: give it integer inputs")
    return _clip(torch.round(x.to(torch.float64) / net.input_scale), net.input_type).to(torch.int64)
