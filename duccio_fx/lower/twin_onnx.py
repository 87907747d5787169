"""The standard-ops twin of an `IntNet`: an ONNX file onnxruntime runs, with every layer's output exactly the
integer executor's.

Why a twin: the Quantlab file DORY reads keeps part of its arithmetic in custom attributes (the residual
add's requantization), so no standard runtime can run it. The twin spells the same integer arithmetic
(`intnet`'s module docstring, `int_executor`) with standard opset-13 ops and gives every layer its own graph
output `layer{i}` (int64, [N, ...], dynamic batch), so an independent runtime can be compared with our
executor on every value of every layer.

Exactness, op by op (onnxruntime's CPU provider has no double Conv or AveragePool):

* activations travel as float64 holding integers; every step checks, from the constants and the value ranges,
  that no intermediate reaches 2^53, so Mul/Add/Sub/MatMul/ReduceSum are exact in any summation order,
  Div by 2^shift is exact and Floor(Div) is the arithmetic shift `>>`;
* convolution (and the window sum of an average pool) is `ConvInteger` on **uint8 × uint8** only: the input
  is padded with zeros in float64 first (no reliance on ConvInteger's padding rules), a signed input is
  offset by +128 (its pad values too), and the weight is split as `w = w⁺ − w⁻` with both halves uint8, so
  `acc = conv(x+o, w⁺) − conv(x+o, w⁻) − o·Σw`. Why not int8 weights: on x86 CPUs without VNNI, onnxruntime's
  u8×s8 kernel (VPMADDUBSW) saturates pairwise sums at int16, and s8 activations take other kernels per CPU;
  u8×u8 is exact on every dispatch. Each ConvInteger's int32 accumulator is checked against 2^31;
* max pooling is `MaxPool` / `ReduceMax` in float64 (ONNX pads never win a maximum, like -inf);
* average pooling requantizes with `mul / K` (K the window size, C division), as the kernel and `int_executor` do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.intnet import (NETWORK_INPUT, Add, Branch, Conv, IntNet, IntType, Linear, Pool, Requant,
                                    pool_multiplier)

OPSET = 13
IR_VERSION = 8  # onnxruntime 1.31 refuses the IR version 14 that onnx 1.23 writes by default
EXACT = 2 ** 53  # float64 holds every integer of smaller magnitude
INT32 = 2 ** 31  # ConvInteger accumulates in int32
INPUT_TYPE_KEY = "duccio_fx.input_type"  # metadata: the network input's IntType, "<bits>,<signed>"


def _need(ok: bool, what: str, where: str, fix: str) -> None:
    if not ok:
        raise DuccioError(what, where=where, fix=fix)


def _magnitude(t: IntType) -> int:
    return max(-t.lo, t.hi)


class _Graph:
    """Nodes and constants of the twin, with unique tensor names."""

    def __init__(self) -> None:
        from onnx import (  # the ONNX stack loads only when a twin is written
            TensorProto,
            helper,
            numpy_helper,
        )
        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}#{self.count}"

    def const(self, hint: str, value: Any, dtype: Any = np.float64) -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        out = self.name(hint)
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


def _channel_shape(rank: int) -> tuple[int, ...]:
    """Per-channel constants broadcast over [N, C, H, W] as [C, 1, 1] and over [N, C] as [C]."""
    return (-1,) + (1,) * (rank - 2)


def _requant(g: _Graph, x: str, rq: Requant, acc_bound: np.ndarray | int, rank: int, hint: str,
             where: str) -> str:
    """`clip((acc * mul + add) >> shift)` as Mul → Add → Div(2^shift) → Floor → Clip in float64, after
    checking that |acc·mul + add| (with |acc| ≤ `acc_bound`, per channel or scalar) stays below 2^53."""
    mul, add = np.asarray(rq.mul, dtype=np.int64), np.asarray(rq.add, dtype=np.int64)
    worst = np.asarray(acc_bound, dtype=object) * np.abs(mul).astype(object) + np.abs(add).astype(object)
    _need(int(np.max(worst)) < EXACT, f"the requantization can reach {int(np.max(worst))}, beyond the 2^53 "
          "that float64 holds exactly", where, "lower the network with smaller requant multipliers")
    _need(rq.shift >= 0, f"negative requant shift {rq.shift}", where, "requant shifts are right shifts (>= 0)")
    shape = _channel_shape(rank) if rq.per_channel else ()
    x = g.op("Mul", [x, g.const(f"{hint}/mul", mul.reshape(shape))], f"{hint}/mul")
    x = g.op("Add", [x, g.const(f"{hint}/add", add.reshape(shape))], f"{hint}/add")
    x = g.op("Div", [x, g.const(f"{hint}/2^shift", float(2 ** rq.shift))], f"{hint}/shift")
    x = g.op("Floor", [x], f"{hint}/floor")
    return g.op("Clip", [x, g.const(f"{hint}/lo", float(rq.out.lo)), g.const(f"{hint}/hi", float(rq.out.hi))],
                f"{hint}/clip")


def _offset(t: IntType, where: str) -> int:
    """What to add to a `t` value so it is a uint8 (0 for unsigned, 128 for signed types up to 8 bits)."""
    _need(t.bits <= 8, f"a {t.name} input cannot feed ConvInteger, whose inputs are 8-bit", where,
          "requantize to 8 bits before a convolution or average pooling")
    return 128 if t.signed else 0


def _uint8_input(g: _Graph, x: str, pads: tuple[int, int, int, int], offset: int, hint: str) -> str:
    """Zero-pad in float64 (so padding means 0 whatever ConvInteger does with pads), offset, Cast to uint8."""
    top, left, bottom, right = pads
    if any(pads):
        x = g.op("Pad", [x, g.const(f"{hint}/pads", [0, 0, top, left, 0, 0, bottom, right], np.int64)],
                 f"{hint}/pad")
    if offset:
        x = g.op("Add", [x, g.const(f"{hint}/offset", float(offset))], f"{hint}/offset")
    return g.op("Cast", [x], f"{hint}/u8", to=g.TensorProto.UINT8)


def _window_sums(g: _Graph, xu: str, weight: np.ndarray, umax: int, hint: str, where: str,
                 **attrs: Any) -> str:
    """`conv(xu, w⁺) − conv(xu, w⁻)` in float64 with two uint8 × uint8 ConvIntegers (xu ≤ `umax`)."""
    flat = weight.reshape(weight.shape[0], -1)
    _need(int(np.abs(flat).max(initial=0)) <= 255, "a weight beyond ±255 does not fit the uint8 halves of the "
          "exact ConvInteger", where, "use weights of at most 9 bits")
    halves = [np.maximum(weight, 0), np.maximum(-weight, 0)]
    worst = max(int(h.reshape(h.shape[0], -1).sum(axis=1).max(initial=0)) * umax for h in halves)
    _need(worst < INT32, f"a ConvInteger accumulator can reach {worst}, beyond int32", where,
          "split the layer: its input channels times kernel size are too many for an int32 accumulator")
    sums = []
    for sign, half in zip("+-", halves):
        if sign == "-" and not half.any():
            break
        acc = g.op("ConvInteger", [xu, g.const(f"{hint}/w{sign}", half, np.uint8)], f"{hint}/conv{sign}", **attrs)
        sums.append(g.op("Cast", [acc], f"{hint}/acc{sign}", to=g.TensorProto.DOUBLE))
    return sums[0] if len(sums) == 1 else g.op("Sub", sums, f"{hint}/acc")


def _conv(g: _Graph, layer: Conv, x: str, src: IntType, hint: str, where: str) -> str:
    """`acc = Σ w·x + bias`, then the per-channel requant."""
    offset = _offset(src, where)
    weight = np.asarray(layer.weight, dtype=np.int64)
    cout, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    xu = _uint8_input(g, x, layer.pads, offset, hint)
    acc = _window_sums(g, xu, weight, src.hi + offset, hint, where, group=layer.groups,
                       kernel_shape=[int(kh), int(kw)], strides=list(layer.stride))
    wsum = weight.reshape(cout, -1).sum(axis=1)
    bias = np.zeros(cout, dtype=np.int64) if layer.bias is None else np.asarray(layer.bias, dtype=np.int64)
    correction = bias - offset * wsum  # the offset's share of every window, plus the bias
    _need(int(np.abs(correction).max(initial=0)) < EXACT // 4, "a bias beyond 2^51", where, "fold it into requant.add")
    if correction.any():
        acc = g.op("Add", [acc, g.const(f"{hint}/bias", correction.reshape(-1, 1, 1))], f"{hint}/bias")
    bound = np.abs(weight).reshape(cout, -1).sum(axis=1).astype(object) * _magnitude(src) + np.abs(bias).astype(object)
    return _requant(g, acc, layer.requant, bound, 4, f"{hint}/rq", where)


def _linear(g: _Graph, layer: Linear, x: str, in_bound: int, hint: str, where: str) -> tuple[str, int]:
    """Flatten (CHW order) → MatMul(Wᵀ) → + bias in float64, then the requant or the raw accumulator."""
    weight = np.asarray(layer.weight, dtype=np.int64)
    bias = np.zeros(weight.shape[0], dtype=np.int64) if layer.bias is None else np.asarray(layer.bias, np.int64)
    bound = np.abs(weight).sum(axis=1).astype(object) * in_bound + np.abs(bias).astype(object)
    _need(int(np.max(bound)) < EXACT, f"the accumulator can reach {int(np.max(bound))}, beyond 2^53", where,
          "lower the network with narrower activations")
    x = g.op("Flatten", [x], f"{hint}/flatten", axis=1)
    acc = g.op("MatMul", [x, g.const(f"{hint}/weight_t", weight.T)], f"{hint}/matmul")
    if layer.bias is not None:
        acc = g.op("Add", [acc, g.const(f"{hint}/bias", bias)], f"{hint}/bias")
    if layer.requant is None:
        return acc, int(np.max(bound))
    return _requant(g, acc, layer.requant, bound, 2, f"{hint}/rq", where), _magnitude(layer.requant.out)


def _clip_shift(g: _Graph, x: str, mul: int, add: int, shift: int, into: IntType, in_bound: int, hint: str,
                where: str) -> str:
    """`clip((x * mul + add) >> shift, into)` for a residual add, in float64."""
    rq = Requant(np.array(mul, dtype=np.int64), np.array(add, dtype=np.int64), shift, into)
    return _requant(g, x, rq, in_bound, 4, hint, where)


def _add(g: _Graph, layer: Add, x1: str, x2: str, bounds: tuple[int, int], hint: str, where: str) -> str:
    """Both branches to the output scale, their sum, then the output requant."""
    branches: list[tuple[Branch, str, int]] = [(layer.in1, x1, bounds[0]), (layer.in2, x2, bounds[1])]
    b1, b2 = (_clip_shift(g, x, b.mul, b.add, b.shift, b.into, bound, f"{hint}/in{k + 1}", where)
              for k, (b, x, bound) in enumerate(branches))
    total = g.op("Add", [b1, b2], f"{hint}/sum")
    total_bound = _magnitude(layer.in1.into) + _magnitude(layer.in2.into)
    return _clip_shift(g, total, layer.out_mul, layer.out_add, layer.out_shift, layer.out, total_bound,
                       f"{hint}/out", where)


def _pool(g: _Graph, layer: Pool, x: str, src: IntType, in_bound: int, in_shape: tuple[int, ...], hint: str,
          where: str) -> tuple[str, int]:
    """Max: MaxPool/ReduceMax. Avg: the exact window sum, then the requant or `floor(sum / K)`."""
    kernel = tuple(in_shape[1:]) if layer.global_ else layer.kernel
    if layer.mode == "max":
        # int_executor ignores a requant after max pooling while IntNet.out_type reports its type: ambiguous
        _need(layer.requant is None, "max pooling with a requant: the integer executor ignores it", where,
              "drop the requant of the max pooling (its maximum is already in the input's range)")
        if layer.global_:
            return g.op("ReduceMax", [x], f"{hint}/max", axes=[2, 3], keepdims=1), in_bound
        return g.op("MaxPool", [x], f"{hint}/max", kernel_shape=list(kernel), strides=list(layer.stride),
                    pads=list(layer.pads)), in_bound
    _need(layer.mode == "avg", f"unknown pooling mode {layer.mode!r}", where, "use 'max' or 'avg'")
    window = int(kernel[0] * kernel[1])
    if layer.global_:
        total = g.op("ReduceSum", [x, g.const(f"{hint}/axes", [2, 3], np.int64)], f"{hint}/sum", keepdims=1)
    else:
        offset = _offset(src, where)
        xu = _uint8_input(g, x, layer.pads, offset, hint)
        channels = int(in_shape[0])
        ones = np.ones((channels, 1, *kernel), dtype=np.int64)
        total = _window_sums(g, xu, ones, src.hi + offset, hint, where, group=channels,
                             kernel_shape=list(kernel), strides=list(layer.stride))
        if offset:
            total = g.op("Sub", [total, g.const(f"{hint}/offset_sum", float(offset * window))], f"{hint}/sum")
    sum_bound = window * in_bound
    if layer.requant is not None:  # the kernel divides the multiplier by the window first, as int_executor
        rq = layer.requant
        rq = Requant(pool_multiplier(rq.mul, window), rq.add, rq.shift, rq.out)
        return _requant(g, total, rq, sum_bound, 4, f"{hint}/rq", where), _magnitude(rq.out)
    # floor(s / K) of a correctly rounded quotient is exact while |s| < 2^52
    _need(sum_bound < EXACT // 2, "an average pooling sum beyond 2^52", where, "give the pooling a requant")
    quotient = g.op("Div", [total, g.const(f"{hint}/window", float(window))], f"{hint}/div")
    return g.op("Floor", [quotient], f"{hint}/floor"), in_bound


def write_twin(net: IntNet, shapes: list[tuple[int, ...]]) -> bytes:
    """The twin ONNX bytes of `net` (`shapes`: each layer's output shape without batch, from
    `int_executor.output_shapes`). Raises `DuccioError` when a layer cannot be run exactly."""
    import onnx
    from onnx import TensorProto, helper

    _need(len(shapes) == len(net.layers), f"{len(shapes)} shapes for {len(net.layers)} layers", "write_twin",
          "pass int_executor.output_shapes(net)")
    g = _Graph()
    outputs = {f"layer{i}" for i in range(len(net.layers))}
    input_name = net.input_name if net.input_name not in outputs else "input"
    network_input = g.op("Cast", [input_name], "input", to=TensorProto.DOUBLE)
    names: list[str] = []
    bounds: list[int] = []  # max |value| of each layer's output

    def value(index: int) -> tuple[str, IntType, int, tuple[int, ...]]:
        if index == NETWORK_INPUT:
            return network_input, net.input_type, _magnitude(net.input_type), tuple(net.input_shape)
        return names[index], net.out_type(index), bounds[index], tuple(shapes[index])

    for i, layer in enumerate(net.layers):
        hint, where = f"l{i}", f"integer layer {i} ({layer.name})"
        if isinstance(layer, Conv):
            x, src, _, _ = value(layer.input)
            names.append(_conv(g, layer, x, src, hint, where))
            bounds.append(_magnitude(layer.requant.out))
        elif isinstance(layer, Linear):
            x, _, in_bound, _ = value(layer.input)
            out, bound = _linear(g, layer, x, in_bound, hint, where)
            names.append(out)
            bounds.append(bound)
        elif isinstance(layer, Add):
            (x1, _, bound1, _), (x2, _, bound2, _) = value(layer.inputs[0]), value(layer.inputs[1])
            names.append(_add(g, layer, x1, x2, (bound1, bound2), hint, where))
            bounds.append(_magnitude(layer.out))
        elif isinstance(layer, Pool):
            x, src, in_bound, in_shape = value(layer.input)
            out, bound = _pool(g, layer, x, src, in_bound, in_shape, hint, where)
            names.append(out)
            bounds.append(bound)
        else:  # pragma: no cover - the IntLayer union is closed
            raise TypeError(f"unknown integer layer {type(layer).__name__}")

    for i, name in enumerate(names):
        g.nodes.append(helper.make_node("Cast", [name], [f"layer{i}"], name=f"layer{i}", to=TensorProto.INT64))
    graph = helper.make_graph(
        g.nodes, "duccio_fx_twin",
        [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["N", *net.input_shape])],
        [helper.make_tensor_value_info(f"layer{i}", TensorProto.INT64, ["N", *shape])
         for i, shape in enumerate(shapes)],
        g.initializers)
    model = helper.make_model(graph, producer_name="duccio-fx", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {INPUT_TYPE_KEY: f"{net.input_type.bits},{int(net.input_type.signed)}"})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def run_twin(data: bytes, x: np.ndarray) -> list[np.ndarray]:
    """Every layer's output (int64 arrays, batch dim kept) of the twin `data` for the integer input `x`
    ([N, C, H, W] or [C, H, W], values in the network's input type), run by onnxruntime's CPU provider.

    Graph optimizations are off: the twin is a reference, and no rewrite should stand between the file and
    the values it is compared on."""
    import onnxruntime as ort

    array = np.asarray(x)
    _need(bool(np.all(array == np.round(array))), "the twin's input must hold integers", "run_twin",
          "quantize the input first (int_executor.quantize_input)")
    array = array.astype(np.int64)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # onnxruntime's worker threads spin after a run and slow torch down in the same process by 30x: no spinning
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if INPUT_TYPE_KEY in meta:
        bits, signed = meta[INPUT_TYPE_KEY].split(",")
        t = IntType(int(bits), bool(int(signed)))
        _need(array.size == 0 or (int(array.min()) >= t.lo and int(array.max()) <= t.hi),
              f"input values in [{int(array.min())}, {int(array.max())}] are outside the network's {t.name}",
              "run_twin", "clip the input to the network's input type")
    graph_input = session.get_inputs()[0]
    if array.ndim == len(graph_input.shape) - 1:
        array = array[None]
    names = [o.name for o in session.get_outputs()]
    return [np.asarray(v, dtype=np.int64) for v in session.run(names, {graph_input.name: array})]


__all__ = ["IR_VERSION", "OPSET", "run_twin", "write_twin"]
