"""Measure the conv and linear work an opaque op does: what its graph node does not show.

A function torch.fx does not trace into (`torch.fx.wrap`, e.g. torchvision's `shifted_window_attention`, which
gets the qkv and projection weights as arguments), a leaf module with weights (`nn.MultiheadAttention`, a
user's leaf) or a matmul with a parameter multiplies by the model's weights where no Conv/Linear node is.
Shape propagation runs such a node under `WeightedWorkMode`, which sees every torch function it calls and
counts convolutions (any weight) and linear maps (F.linear, matmul, einsum, ...) whose weight operand is a
model parameter: so costs never silently leave a layer out, whatever hides it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from duccio_fx.ir.meta import WeightedWork

_CONVS = {F.conv1d, F.conv2d, F.conv3d}
_TRANSPOSED = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_PRODUCTS = {torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
             torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm}
_ADD_PRODUCTS = {torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.baddbmm}


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class WeightedWorkMode(TorchFunctionMode):
    """Counts, while active, the weights, biases and MACs of conv and linear calls on `parameters`
    (storage pointer → qualified name); MACs are summed over the whole batch."""

    def __init__(self, parameters: Mapping[int, str]) -> None:
        super().__init__()
        self.parameters = parameters
        self.weights: dict[str, int] = {}
        self.biases: dict[str, int] = {}
        self.macs = 0

    def _name(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        return self.parameters.get(t.untyped_storage().data_ptr())

    def _weight(self, t: torch.Tensor, name: str | None) -> None:
        key = name or f"<computed weight {len(self.weights)}>"  # a weight computed from parameters
        if name is None or name not in self.weights:
            self.weights[key] = t.numel()

    def _bias(self, t: Any) -> None:
        name = self._name(t)
        if name is not None:
            self.biases[name] = t.numel()

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONVS or func in _TRANSPOSED:
            x, w = args[0], _arg(args, kwargs, 1, "weight")
            self._weight(w, self._name(w))
            self._bias(_arg(args, kwargs, 2, "bias"))
            per_output = w.numel() // w.shape[0]
            self.macs += (x.numel() if func in _TRANSPOSED else out.numel()) * per_output
        elif func is F.linear:
            w = _arg(args, kwargs, 1, "weight")
            self._weight(w, self._name(w))
            self._bias(_arg(args, kwargs, 2, "bias"))
            self.macs += out.numel() * w.shape[-1]
        elif func in _PRODUCTS or func in _ADD_PRODUCTS:
            first = 1 if func in _ADD_PRODUCTS else 0
            a, b = args[first], args[first + 1]
            for operand in (a, b):
                name = self._name(operand)
                if name is not None:
                    self._weight(operand, name)
                    self.macs += out.numel() * a.shape[-1]
                    if func in _ADD_PRODUCTS:
                        self._bias(args[0])
                    break
        elif func is torch.einsum and any(self._name(t) is not None for t in args[1:]):
            for t in args[1:]:
                if (name := self._name(t)) is not None:
                    self._weight(t, name)
            self.macs += math.prod(out.shape) * _contracted(args[0], args[1:])
        return out

    def work(self, batch: int) -> WeightedWork:
        return WeightedWork(sum(self.weights.values()), sum(self.biases.values()), self.macs // max(batch, 1),
                            tuple(sorted(k for k in self.weights if not k.startswith("<")) + sorted(self.biases)))


def _contracted(equation: str, operands: tuple[Any, ...]) -> int:
    """Product of the sizes of the indices an einsum sums over (present in the inputs, absent in the output)."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for spec, t in zip(inputs.split(","), operands):
        for letter, size in zip(spec, getattr(t, "shape", ())):
            sizes[letter] = size
    return math.prod(size for letter, size in sizes.items() if letter not in output)
