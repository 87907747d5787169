"""The Quantlab ONNX format that DORY's frontend reads: writer and reader of an `IntNet`.

The format (DORY commit be3d6dd, Quantlab frontend): opset 10, batch 1, static shapes, float32 tensors that
hold integers, intermediate tensor names that are decimal numbers increasing in node order (DORY calls
`int()` on them). A DORY layer is spelled as:

* conv: `Conv {weight_bits, bias_bits}` → `Mul(k[C,1,1]) {mult_bits}` → `Add(l[C,1,1]) {add_bits}` →
  `Div(Constant 2^D)` → `Floor` → `Clip {min, max, out_bits}` (min < 0 makes the output signed);
* linear: `Flatten` → `MatMul(W[Cin,Cout]) {weight_bits}` (or `Gemm` with a `*.bias` initializer), with the
  same requant chain with k/l shaped [C], or none for an int32 head;
* pooling: `MaxPool`, or `AveragePool`/`GlobalAveragePool` with a scalar requant chain;
* residual add: `Add` of two activations carrying in1_*/in2_*/out_* requant attributes and `add_bits`.

The reader accepts the same patterns (plus a `Pad` before a conv or pool, and the ops DORY ignores), so
files made by Quantlab itself can be executed and compared with their golden activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.int_executor import output_shapes
from duccio_fx.lower.intnet import (NETWORK_INPUT, Add, Branch, Conv, IntLayer, IntNet, IntType,
                                    Linear, Pool, Requant)

OPSET = 10
# Ops DORY's Quantlab frontend accepts but turns into no layer (Parser.py:40).
IGNORED_OPS = frozenset({"Cast", "Floor", "Flatten", "Shape", "Gather", "Unsqueeze", "Concat", "Reshape",
                         "Sigmoid", "LogSoftmax", "Squeeze"})


# --------------------------------------------------------------------------------------------------- writer

class _Writer:
    """Builds the graph with tensor names numbered in node order."""

    def __init__(self, input_name: str) -> None:
        from onnx import helper, numpy_helper  # the ONNX stack loads only when a file is written
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.counter = 0
        self.input_name = input_name

    def tensor(self) -> str:
        self.counter += 1
        return str(self.counter)

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self.tensor()
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def requant(self, x: str, rq: Requant, prefix: str, shape: tuple[int, ...]) -> str:
        mul = rq.mul.reshape(shape) if rq.per_channel else rq.mul.reshape(())
        add = rq.add.reshape(shape) if rq.per_channel else rq.add.reshape(())
        x = self.node("Mul", [x, self.const(f"{prefix}.mul", mul)], mult_bits=32)
        x = self.node("Add", [x, self.const(f"{prefix}.add", add)], add_bits=32)
        divisor = self.node("Constant", [], value=self.numpy_helper.from_array(
            np.array(float(2 ** rq.shift), dtype=np.float32)))
        x = self.node("Div", [x, divisor])
        x = self.node("Floor", [x])
        return self.node("Clip", [x], min=float(rq.out.lo), max=float(rq.out.hi), out_bits=rq.out.bits)


def write_quantlab(net: IntNet, shapes: list[tuple[int, ...]]) -> bytes:
    """The Quantlab ONNX bytes of `net` (`shapes`: each layer's output shape, from the executor)."""
    from onnx import TensorProto, helper

    _check_exact_float32(net)
    w = _Writer(net.input_name)
    names: list[str] = []

    def name_of(index: int) -> str:
        return w.input_name if index == NETWORK_INPUT else names[index]

    for i, layer in enumerate(net.layers):
        prefix = f"layer{i}"
        if isinstance(layer, Conv):
            kh, kw = layer.weight.shape[2:]
            inputs = [name_of(layer.input), w.const(f"{prefix}.weight", layer.weight)]
            if layer.bias is not None:
                inputs.append(w.const(f"{prefix}.bias", layer.bias))
            x = w.node("Conv", inputs, dilations=[1, 1], group=layer.groups, kernel_shape=[int(kh), int(kw)],
                       pads=[layer.pads[0], layer.pads[1], layer.pads[2], layer.pads[3]],
                       strides=list(layer.stride), weight_bits=layer.weight_bits, bias_bits=32)
            names.append(w.requant(x, layer.requant, prefix, (-1, 1, 1)))
        elif isinstance(layer, Linear):
            x = name_of(layer.input)
            source_shape = net.input_shape if layer.input == NETWORK_INPUT else shapes[layer.input]
            if len(source_shape) > 1:
                x = w.node("Flatten", [x], axis=1)
            weight = w.const(f"{prefix}.weight", layer.weight.T)  # [Cin, Cout]: DORY's unambiguous layout
            if layer.bias is not None:
                x = w.node("Gemm", [x, weight, w.const(f"{prefix}.bias", layer.bias)], weight_bits=layer.weight_bits,
                           bias_bits=32)
            else:
                x = w.node("MatMul", [x, weight], weight_bits=layer.weight_bits, bias_bits=32)
            names.append(x if layer.requant is None else w.requant(x, layer.requant, prefix, (-1,)))
        elif isinstance(layer, Pool):
            source = name_of(layer.input)
            if layer.global_:
                x = w.node("GlobalAveragePool", [source])
            else:
                op = "MaxPool" if layer.mode == "max" else "AveragePool"
                x = w.node(op, [source], kernel_shape=list(layer.kernel), strides=list(layer.stride),
                           pads=[layer.pads[0], layer.pads[1], layer.pads[2], layer.pads[3]])
            names.append(x if layer.requant is None else w.requant(x, layer.requant, prefix, ()))
        elif isinstance(layer, Add):
            attrs: dict[str, int] = {}
            for key, branch in (("in1", layer.in1), ("in2", layer.in2)):
                attrs.update({f"{key}_mul": branch.mul, f"{key}_add": branch.add, f"{key}_shift": branch.shift,
                              f"{key}_n_levels": 1 << branch.into.bits, f"{key}_rq": 1})
            attrs.update(out_mul=layer.out_mul, out_add=layer.out_add, out_shift=layer.out_shift,
                         out_n_levels=1 << layer.out.bits, out_rq=1, add_bits=layer.out.bits,
                         out_signed=int(layer.out.signed))
            names.append(w.node("Add", [name_of(layer.inputs[0]), name_of(layer.inputs[1])], **attrs))
    graph = helper.make_graph(
        w.nodes, "duccio_fx_dory",
        [helper.make_tensor_value_info(net.input_name, TensorProto.FLOAT, [1, *net.input_shape])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, *shapes[-1]])],
        w.initializers)
    model = helper.make_model(graph, producer_name="duccio-fx", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 6
    return model.SerializeToString()


def _check_exact_float32(net: IntNet) -> None:
    """Every constant must survive the float32 storage of the Quantlab file exactly (integers beyond 2^24
    only when float32 happens to hold them)."""
    for i, layer in enumerate(net.layers):
        arrays = []
        if isinstance(layer, (Conv, Linear)):
            arrays.append(layer.weight)
            if layer.bias is not None:
                arrays.append(layer.bias)
        if isinstance(layer, (Conv, Linear, Pool)) and layer.requant is not None:
            arrays += [layer.requant.mul, layer.requant.add]
        for array in arrays:
            stored = np.asarray(array, dtype=np.float32).astype(np.float64)
            bad = np.flatnonzero(stored.reshape(-1) != np.asarray(array, dtype=np.float64).reshape(-1))
            if bad.size:
                value = int(np.asarray(array).reshape(-1)[bad[0]])
                raise DuccioError(f"integer layer {i} ({layer.name}) has a constant {value} that float32 cannot "
                                  "hold exactly", where=f"integer layer {layer.name}",
                                  fix="lower it with a smaller requant shift (the lowering keeps constants below 2^24)")


# --------------------------------------------------------------------------------------------------- reader

@dataclass
class _Pending:
    """A layer whose requant chain is still being read."""

    make: Any  # callable(requant | None) -> IntLayer
    mul: np.ndarray | None = None
    add: np.ndarray | None = None
    shift: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def read_quantlab(source: bytes | str | Path, *, input_bits: int = 8, input_signed: bool = False) -> IntNet:
    """An `IntNet` from a Quantlab ONNX file (or its bytes); the input type comes from DORY's config."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(str(source))
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise DuccioError(f"a Quantlab network has one input, this one has {len(inputs)}", where="ONNX graph inputs")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    net = IntNet(input_shape=tuple(dims[1:]), input_type=IntType(input_bits, input_signed), layers=[],
                 input_name=inputs[0].name)
    where: dict[str, int] = {inputs[0].name: NETWORK_INPUT}  # tensor -> layer index (finished layers)
    pending: dict[str, _Pending] = {}  # tensor -> layer still reading its requant
    pads: dict[str, tuple[str, list[int]]] = {}  # Pad output -> (its input, pads t l b r)

    def finish(tensor: str) -> None:
        if tensor in pending:
            p = pending.pop(tensor)
            requant = None
            if p.mul is not None:
                raise DuccioError(f"tensor {tensor}: a requant chain without its Clip", where=f"ONNX tensor {tensor}")
            net.layers.append(p.make(requant))
            where[tensor] = len(net.layers) - 1

    def source(tensor: str) -> int:
        finish(tensor)
        if tensor not in where:
            raise DuccioError(f"tensor {tensor} is used before DORY knows its producer", where=f"ONNX tensor {tensor}")
        return where[tensor]

    def operand(node: Any) -> tuple[str, np.ndarray | None]:
        activation = [t for t in node.input if t not in consts]
        constant = [consts[t] for t in node.input if t in consts]
        return activation[0], (constant[0] if constant else None)

    for node in graph.node:
        op, a, out = node.op_type, _attrs(node), node.output[0]
        if op == "Constant":
            consts[out] = numpy_helper.to_array(a["value"]).astype(np.float64)
        elif op == "Pad":
            mode = a.get("mode", b"constant")
            p = a["pads"]
            pads[out] = (node.input[0], [p[2], p[3], p[6], p[7]])
            if mode not in (b"constant", "constant"):
                raise DuccioError(f"Pad mode {mode!r} is not zero padding", where=f"ONNX node {node.name or out}")
        elif op == "Conv":
            x, extra = node.input[0], [0, 0, 0, 0]
            if x in pads:
                x, extra = pads[x]
            weight = consts[node.input[1]].astype(np.int64)
            bias = consts[node.input[2]].astype(np.int64) if len(node.input) > 2 else None
            p = a.get("pads", [0, 0, 0, 0])
            conv_pads = (p[0] + extra[0], p[1] + extra[1], p[2] + extra[2], p[3] + extra[3])
            src = source(x)
            pending[out] = _Pending(lambda rq, src=src, weight=weight, bias=bias, a=a, conv_pads=conv_pads, out=out:
                                    Conv(f"conv{out}", src, weight, tuple(a.get("strides", [1, 1])), conv_pads,
                                         int(a.get("group", 1)), rq, bias, int(a.get("weight_bits", 8))))
        elif op in ("MatMul", "Gemm"):
            weight = consts[node.input[1]].astype(np.int64)
            src = source(node.input[0])
            shape = net.input_shape if src == NETWORK_INPUT else _shape_of(net, src)
            cin = int(np.prod(shape))
            if op == "Gemm" and a.get("transB", 0):
                weight = weight.T
            weight = weight.T if weight.shape[0] == cin else weight  # DORY's rule: [Cin, Cout] when shape[0]==Cin
            bias = consts[node.input[2]].astype(np.int64).reshape(-1) if len(node.input) > 2 else None
            pending[out] = _Pending(lambda rq, src=src, weight=weight, bias=bias, a=a, out=out:
                                    Linear(f"fc{out}", src, weight, rq, bias, int(a.get("weight_bits", 8))))
        elif op in ("MaxPool", "AveragePool", "GlobalAveragePool"):
            x, extra = node.input[0], [0, 0, 0, 0]
            if x in pads:
                x, extra = pads[x]
            src = source(x)
            p = a.get("pads", [0, 0, 0, 0])
            pool_pads = (p[0] + extra[0], p[1] + extra[1], p[2] + extra[2], p[3] + extra[3])
            make = (lambda rq, src=src, a=a, op=op, pool_pads=pool_pads, out=out:
                    Pool(f"pool{out}", src, "max" if op == "MaxPool" else "avg",
                         tuple(a.get("kernel_shape", [1, 1])), tuple(a.get("strides", a.get("kernel_shape", [1, 1]))),
                         pool_pads, rq, op == "GlobalAveragePool"))
            if op == "MaxPool":
                net.layers.append(make(None))
                where[out] = len(net.layers) - 1
            else:
                pending[out] = _Pending(make)
        elif op == "Mul" and operand(node)[0] in pending and operand(node)[1] is not None:
            x, k = operand(node)
            p = pending.pop(x)
            p.mul = k.astype(np.int64).reshape(-1) if k.ndim else k.astype(np.int64)
            pending[out] = p
        elif op == "Add" and operand(node)[1] is not None and operand(node)[0] in pending:
            x, l_ = operand(node)
            p = pending.pop(x)
            p.add = l_.astype(np.int64).reshape(-1) if l_.ndim else l_.astype(np.int64)
            pending[out] = p
        elif op == "Div" and node.input[0] in pending:
            p = pending.pop(node.input[0])
            p.shift = int(round(math.log2(float(consts[node.input[1]]))))
            pending[out] = p
        elif op == "Floor" and node.input[0] in pending:
            pending[out] = pending.pop(node.input[0])
        elif op == "Clip" and node.input[0] in pending:
            p = pending.pop(node.input[0])
            lo = a.get("min", 0.0)
            bits = int(a.get("out_bits", 8))
            out_type = IntType(bits, lo < 0)
            mul = p.mul if p.mul is not None else np.array(1, dtype=np.int64)
            add = p.add if p.add is not None else np.zeros_like(mul)
            net.layers.append(p.make(Requant(mul, add, p.shift or 0, out_type)))
            where[out] = len(net.layers) - 1
        elif op == "Add":
            if len(node.input) != 2 or any(t in consts for t in node.input):
                raise DuccioError("an Add that is neither a requant step nor a residual add of two activations",
                                  where=f"ONNX node {node.name or out}")
            first, second = source(node.input[0]), source(node.input[1])
            in_types = [net.input_type if s == NETWORK_INPUT else net.out_type(s) for s in (first, second)]
            signed = bool(a.get("out_signed", any(t.signed for t in in_types)))
            out_type = IntType(int(math.log2(a["out_n_levels"])), signed)
            branches = [Branch(int(a[f"{k}_mul"]), int(a[f"{k}_add"]), int(a[f"{k}_shift"]), IntType(8, t.signed))
                        for k, t in zip(("in1", "in2"), in_types)]
            net.layers.append(Add(f"add{out}", (first, second), branches[0], branches[1], int(a["out_mul"]),
                                  int(a["out_add"]), int(a["out_shift"]), out_type))
            where[out] = len(net.layers) - 1
        elif op in IGNORED_OPS:
            for tensor in node.input:
                if tensor in pending:
                    finish(tensor)
            produced = [where[t] for t in node.input if t in where]
            if produced:
                where[out] = produced[0]
        else:
            raise DuccioError(f"op {op} is not part of the Quantlab format DORY reads", where=f"ONNX node {node.name or out}")
    for tensor in list(pending):
        finish(tensor)
    return net


def _shape_of(net: IntNet, index: int) -> tuple[int, ...]:
    return output_shapes(IntNet(net.input_shape, net.input_type, net.layers[: index + 1]))[index]


__all__ = ["write_quantlab", "read_quantlab", "IGNORED_OPS", "IntLayer"]
