"""The integer network: what DORY runs, one record per DORY layer, with every constant an integer.

Why a representation of its own: the lowering passes produce it, the Quantlab reader produces it from a
file made by another toolchain, and every consumer (the integer executor, the Quantlab and standard-ops ONNX
writers, the golden files, the report) reads the same records. A layer here is a layer in DORY's sense,
after its fusions (conv + requant, pool + requant, add), numbered in the order DORY numbers its
`out_layer{i}.txt` files.

Arithmetic (the kernels' integer arithmetic, `>>` is an arithmetic shift, i.e. floor division by 2^shift):

* requant of an accumulator `acc`: `clip((acc * mul + add) >> shift, out.lo, out.hi)`; mul/add per
  output channel after a conv or linear layer, scalars after a pooling layer;
* conv/linear: `acc = Σ w·x + bias` exactly (the executor sums in float64, exact below 2^53), then the requant (or none: a raw int32 head);
* every clip is to the full range of the output type (u8 [0, 255], i8 [-128, 127]): the kernels ignore the
  ONNX Clip's min/max and only read its sign;
* residual add: each branch `b_i = clip((x_i * mul_i + add_i) >> shift_i)` into the 8-bit range of that
  input's signedness, then `clip(((b_1 + b_2) * out_mul + out_add) >> out_shift)` into the output range;
* average pooling: the window's sum `s`, then `clip((s * (mul // K) + add) >> shift)` with K the window size
  (the kernel divides the multiplier by K first, in C integer division, so a lowering picks mul divisible by K); without requant
  `floor(s / K)`; max pooling: the window's maximum, padding skipped.

Sources: pulp-nn-mixed (XpulpV2) `pulp_nn_utils.h` (bn_quant, clip8/clips8), `Add/pulp_nn_add_*.c`,
`AvgPool/pulp_nn_avgpool_*.c`, `LinearNoQuant/pulp_nn_linear_*_i32_*.c`, at the commit DORY be3d6dd pins.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

import numpy as np


@dataclass(frozen=True)
class IntType:
    """An integer activation type: `bits` wide, signed or not."""

    bits: int = 8
    signed: bool = False

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"


UINT8 = IntType(8, False)
INT8 = IntType(8, True)
INT32 = IntType(32, True)


@dataclass(frozen=True)
class Requant:
    """`clip((acc * mul + add) >> shift, out.lo, out.hi)`; `mul`/`add` are int64 arrays, [C] or 0-d."""

    mul: np.ndarray
    add: np.ndarray
    shift: int
    out: IntType

    @property
    def per_channel(self) -> bool:
        return self.mul.ndim > 0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Requant) and self.shift == other.shift and self.out == other.out
                and np.array_equal(self.mul, other.mul) and np.array_equal(self.add, other.add))

    __hash__ = None  # type: ignore[assignment]  # holds arrays


@dataclass(frozen=True, eq=False)
class Conv:
    """A 2-D convolution (depthwise when groups == in channels == out channels) + requant."""

    name: str
    input: int
    weight: np.ndarray  # int64 [Cout, Cin/groups, kH, kW]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    groups: int
    requant: Requant
    bias: np.ndarray | None = None  # int64 [Cout]; the lowering folds biases into requant.add instead
    weight_bits: int = 8


@dataclass(frozen=True, eq=False)
class Linear:
    """A fully connected layer on the CHW-flattened input; without requant its output is the raw int32."""

    name: str
    input: int
    weight: np.ndarray  # int64 [Cout, Cin]
    requant: Requant | None
    bias: np.ndarray | None = None
    weight_bits: int = 8


@dataclass(frozen=True)
class Branch:
    """One input of a residual add, moved to the output scale: `clip((x * mul + add) >> shift, into)`, where
    `into` is the 8-bit type of that input's signedness (the kernel's clip8 / clips8)."""

    mul: int
    add: int
    shift: int
    into: IntType


@dataclass(frozen=True, eq=False)
class Add:
    """A residual add of two activations (`inputs[0]` is the ONNX node's first input, `in1`)."""

    name: str
    inputs: tuple[int, int]
    in1: Branch
    in2: Branch
    out_mul: int
    out_add: int
    out_shift: int
    out: IntType


@dataclass(frozen=True, eq=False)
class Pool:
    """Max or average pooling; `global_` pools the whole input. Average pooling sums the window, then
    requantizes (the requant carries the 1/window factor)."""

    name: str
    input: int
    mode: str  # "max" | "avg"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    requant: Requant | None = None
    global_: bool = False


def pool_multiplier(mul: np.ndarray, window: int) -> np.ndarray:
    """The multiplier an average-pool kernel applies to the window sum: `mul / K` in C integer division
    (rounds toward zero, unlike numpy's `//` for negative values)."""
    mul = np.asarray(mul, dtype=np.int64)
    return np.sign(mul) * (np.abs(mul) // window)


IntLayer = Union[Conv, Linear, Add, Pool]
NETWORK_INPUT = -1


@dataclass(eq=False)
class IntNet:
    """The integer network: its input (shape CHW, type, float scale) and its layers in DORY order.

    `scales[i]` is the real value of one unit of layer i's output (what the lowering chose, or None when the
    network came from a file); `sources[i]` says which node(s) of the model the layer came from.
    """

    input_shape: tuple[int, ...]  # (C, H, W)
    input_type: IntType
    layers: list[IntLayer]
    input_scale: float | None = None
    input_name: str = "input"
    scales: list[float | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def inputs_of(self, i: int) -> tuple[int, ...]:
        layer = self.layers[i]
        return layer.inputs if isinstance(layer, Add) else (layer.input,)

    def out_type(self, i: int) -> IntType:
        """The integer type of layer i's output (int32 for a linear layer without requant)."""
        layer = self.layers[i]
        if isinstance(layer, Add):
            return layer.out
        if isinstance(layer, Pool) and layer.requant is None:
            return self.in_type(i)
        return layer.requant.out if layer.requant is not None else INT32

    def in_type(self, i: int) -> IntType:
        source = self.inputs_of(i)[0]
        return self.input_type if source == NETWORK_INPUT else self.out_type(source)

    def with_layers(self, layers: list[IntLayer]) -> IntNet:
        return replace(self, layers=layers)
