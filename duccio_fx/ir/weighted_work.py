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

    def __enter__(self) -> "WeightedWorkMode":
        # nn.MultiheadAttention's inference fast path fuses its projections into one op: take the plain path
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.backends.mha.set_fastpath_enabled(self._fastpath)
        super().__exit__(*exc)

    def _name(self, t: Any) -> str | None:
        if not isinstance(t, torch.Tensor):
            return None
        return self.parameters.get(t.untyped_storage().data_ptr())

    def _weight(self, t: torch.Tensor, name: str | None) -> None:
        key = name or f"<computed weight {len(self.weights)}>"  # a weight computed from parameters
        if name is None or name not in self.weights:
            self.weights[key] = t.numel()

    def _bias(self, t: Any, computed: bool = True) -> None:
        """A bias argument: a parameter, or (`computed`) a tensor computed from one (swin v2 zeroes a clone's
        key part); the added term of addmm counts only when it is a parameter (else it is an activation)."""
        name = self._name(t) if isinstance(t, torch.Tensor) else None
        if name is not None or (computed and isinstance(t, torch.Tensor)):
            self.biases[name or f"<computed bias {len(self.biases)}>"] = t.numel()

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
                        self._bias(args[0], computed=False)
                    break
        elif func is F.multi_head_attention_forward:
            self._attention(args, kwargs)
        elif func is torch.einsum and any(self._name(t) is not None for t in args[1:]):
            for t in args[1:]:
                if (name := self._name(t)) is not None:
                    self._weight(t, name)
            self.macs += math.prod(out.shape) * _contracted(args[0], args[1:])
        return out

    def _attention(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """F.multi_head_attention_forward is one torch function to this mode (its projections run inside it):
        its q, k, v and output projections, from its arguments ([L, N, E] query, [S, N, E] key and value)."""
        names = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias")
        a = {**dict(zip(names, args)), **kwargs}
        query, key, value = a["query"], a["key"], a["value"]
        if a.get("use_separate_proj_weight"):
            projections = [(a["q_proj_weight"], query), (a["k_proj_weight"], key), (a["v_proj_weight"], value)]
        else:
            e = query.shape[-1]
            w = a["in_proj_weight"]
            projections = [(w[:e], query), (w[e:2 * e], key), (w[2 * e:], value)]
            self._weight(w, self._name(w))
        for w, x in projections:
            if a.get("use_separate_proj_weight"):
                self._weight(w, self._name(w))
            self.macs += x.numel() // x.shape[-1] * w.numel()
        self._bias(a.get("in_proj_bias"))
        out_w = a["out_proj_weight"]
        self._weight(out_w, self._name(out_w))
        self._bias(a.get("out_proj_bias"))
        self.macs += query.numel() // query.shape[-1] * out_w.numel()

    def work(self, batch: int) -> WeightedWork:
        return WeightedWork(sum(self.weights.values()), sum(self.biases.values()), self.macs // max(batch, 1),
                            tuple(sorted(k for k in [*self.weights, *self.biases] if not k.startswith("<"))))


def _contracted(equation: str, operands: tuple[Any, ...]) -> int:
    """Product of the sizes of the indices an einsum sums over (present in the inputs, absent in the output)."""
    inputs, _, output = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for spec, t in zip(inputs.split(","), operands):
        for letter, size in zip(spec, getattr(t, "shape", ())):
            sizes[letter] = size
    return math.prod(size for letter, size in sizes.items() if letter not in output)
