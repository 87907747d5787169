"""integerize: turn the calibrated float graph into DORY's integer network (`lower.intnet.IntNet`).

Per layer, with `s_in`/`s_out` the input/output scales chosen by `calibrate`:

* conv / linear: weights symmetric int8 per output channel, `w_q = round(w / s_w[c])`, `s_w[c] = max|w[c]|/127`.
  The real output is `s_in·s_w[c]·acc + b[c]`, so the integer output is `acc·M[c] + B[c]` with
  `M = s_in·s_w/s_out` and `B = b/s_out`. DORY computes `clip((acc·k + l) >> D)`, so `k = round(M·2^D)` and
  `l = round(B·2^D) + 2^(D-1)` (the bias folds into l — DORY refuses a bias next to a requant — and the
  2^(D-1) turns the floor of the shift into rounding to nearest). D is the largest shift (≤ 31) for which
  every k and l stays below 2^24 (exact in the Quantlab file's float32) and the worst-case `|acc·k + l|`
  (`|acc| ≤ Σ|w_q|·max|x|`) fits the kernel's signed `BNRelu_bits` arithmetic. The error against exact
  rounding is then at most `(max|acc| + 1) / 2^(D+1)` units of the output, reported per layer.
* the int32 head (a last linear without activation): one weight scale for the whole layer, so the int32
  outputs are proportional to the float logits (argmax agrees); its bias is `round(b / (s_in·s_w))`.
* residual add: each input is moved to the output scale, `(x·round(2^sh·s_i/s_out) + 2^(sh-1)) >> sh`,
  with the largest sh ≤ 24 that keeps `255·mul + 2^(sh-1)` in int32; ONNX input[0] is the later layer, as
  DORY's kernel selection assumes when the two inputs differ in signedness.
* average pooling: DORY sums the window and multiplies by `mul // K`, so mul is chosen as `K·m` with
  `m = round(2^D·s_in/(K·s_out))`; max pooling keeps the input's integers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import INTNET_KEY, QuantSpec, TensorInfo, dory_part, quant_spec, tensor_info
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import weight_bits_of
from duccio_fx.lower.intnet import (NETWORK_INPUT, Add, Branch, Conv, IntLayer, IntNet, IntType, Linear,
                                    Pool, Requant)
from duccio_fx.passes.calibrate import head_layers
from duccio_fx.passes.dory_layers import producing_layer
from duccio_fx.passes.fold_batchnorm import FOLDED_FROM

FLOAT32_EXACT = 1 << 24


def _type(spec: QuantSpec) -> IntType:
    return IntType(spec.bits, spec.signed)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass(frozen=True)
class LayerNote:
    """What the report says about one integer layer: where it came from and its rounding bound."""

    node: str
    module: str  # the module's qualified name ('' for functions): what the cost terms are named after
    scale: float | None
    requant_shift: int | None
    error_bound_lsb: float

    @property
    def source(self) -> str:
        return f"{self.node} ({self.module})" if self.module and self.module != self.node else self.node


def choose_requant(m: np.ndarray, b: np.ndarray, acc_max: np.ndarray, out: IntType, bnrelu_bits: int,
                   max_shift: int = 31) -> tuple[Requant, float]:
    """k, l, D for `acc·M + B` (per channel) and the bound of its rounding error in output units."""
    limit = 1 << (bnrelu_bits - 1)
    for shift in range(max_shift, -1, -1):
        k = np.round(m * 2.0 ** shift).astype(np.int64)
        half = 1 << (shift - 1) if shift > 0 else 0
        l_ = np.round(b * 2.0 ** shift).astype(np.int64) + half
        if np.abs(k).max(initial=0) >= FLOAT32_EXACT or np.abs(l_).max(initial=0) >= FLOAT32_EXACT:
            continue
        worst = acc_max.astype(np.float64) * np.abs(k) + np.abs(l_)
        if worst.max(initial=0) >= limit:
            continue
        bound = float(((acc_max + 1) / 2.0 ** (shift + 1)).max(initial=0)) if shift > 0 else \
            float((acc_max * np.abs(m - k) + 0.5).max(initial=0))
        return Requant(k, l_, shift, out), bound
    raise DuccioError("no requantization shift keeps the constants exact and the accumulator in range",
                      fix="report this model (its weights or scales are extreme)")


@dataclass
class Integerize(Pass):
    """Builds the `IntNet` (on `gm.meta['duccio_intnet']`) from the calibrated graph."""

    bnrelu_bits: int = 32
    weight_bits: int = 8
    name = "integerize"
    requires = ("calibrate",)
    notes: list[LayerNote] = field(default_factory=list, init=False)

    def run(self, gm: GraphModule) -> bool:
        if self.bnrelu_bits not in (32, 64):
            raise DuccioError(f"BNRelu_bits {self.bnrelu_bits}: DORY's requant kernels take 32 or 64",
                              where="target [bits] requant", fix="set requant = 32 or 64 in the target file")
        self.gm = gm
        self.notes = []
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        input_spec = quant_spec(placeholder)
        assert input_spec is not None
        info = tensor_info(placeholder)
        assert isinstance(info, TensorInfo)
        self.specs: dict[int, QuantSpec | None] = {NETWORK_INPUT: input_spec}
        self.heads = head_layers(gm)
        mains = sorted(((p.layer, n, p) for n in gm.graph.nodes if (p := dory_part(n)) is not None and p.layer >= 0
                        and p.kind not in ("act",)), key=lambda t: t[0])
        nodes = {n.name: n for n in gm.graph.nodes}
        layers: list[IntLayer] = []
        scales: list[float | None] = []
        for index, node, part in mains:
            spec = quant_spec(nodes[part.output]) if index not in self.heads else None
            layer, scale = self._layer(index, node, part.kind, spec)
            layers.append(layer)
            scales.append(scale)
            self.specs[index] = spec if spec is not None else None
        gm.meta[INTNET_KEY] = IntNet(input_shape=tuple(info.shape[1:]), input_type=_type(input_spec), layers=layers,
                                     input_scale=input_spec.scale, scales=scales,
                                     sources=[n.source for n in self.notes])
        return False

    # -- helpers ---------------------------------------------------------------------------------------

    def _source(self, value: Any) -> int:
        layer = producing_layer(value)
        if layer is None:
            raise DuccioError(f"no integer producer for '{value}'", where="pass 'integerize'")
        return layer

    def _in(self, value: Any) -> tuple[int, QuantSpec]:
        source = self._source(value)
        spec = self.specs.get(source)
        if spec is None:
            raise DuccioError("a layer reads the int32 head's output", where=f"node '{value}'",
                              fix="the head linear must be the last layer")
        return source, spec

    def _note(self, node: Node, scale: float | None, shift: int | None, bound: float) -> None:
        # a per-call copy made by fold-batchnorm is reported (and costed) as the module it was made from
        module = str(node.meta.get(FOLDED_FROM, node.target)) if node.op == "call_module" else ""
        self.notes.append(LayerNote(node.name, module, scale, shift, bound))

    def _layer(self, index: int, node: Node, kind: str, spec: QuantSpec | None) -> tuple[IntLayer, float | None]:
        name = f"layer{index}"
        if kind in ("conv", "linear"):
            return self._weighted(name, index, node, kind, spec)
        if kind == "add":
            return self._add(name, node, spec)
        return self._pool(name, node, kind, spec)

    def _weighted(self, name: str, index: int, node: Node, kind: str,
                  spec: QuantSpec | None) -> tuple[IntLayer, float | None]:
        module = self.gm.get_submodule(str(node.target))
        source, in_spec = self._in(node.args[0])
        weight = module.weight.detach().double().cpu()
        bias = (module.bias.detach().double().cpu() if module.bias is not None
                else torch.zeros(weight.shape[0], dtype=torch.float64))
        bits = weight_bits_of(module) or self.weight_bits  # a layer's own precision (mixed precision)
        qmax = (1 << (bits - 1)) - 1
        flat = weight.reshape(weight.shape[0], -1)
        x_max = max(abs(_type(in_spec).lo), _type(in_spec).hi)
        if kind == "linear" and index in self.heads:
            s_w = float(flat.abs().max()) / qmax or 1.0
            w_q = torch.round(weight / s_w).clamp(-qmax, qmax).to(torch.int64).numpy()
            b_q = np.round(bias.numpy() / (in_spec.scale * s_w)).astype(np.int64)
            if np.abs(b_q).max(initial=0) >= 1 << 31:
                raise DuccioError(f"the head's bias does not fit int32 at its input scale {in_spec.scale:.3g} (the "
                                  "calibrated activations before the head are almost zero)", where=f"node '{node.name}'",
                                  fix="calibrate a trained model on real inputs (the model file's train_loader())")
            self._note(node, in_spec.scale * s_w, None, 0.5)
            return Linear(name, source, w_q, None, b_q, bits), in_spec.scale * s_w
        assert spec is not None
        s_w = flat.abs().amax(dim=1) / qmax
        s_w = torch.where(s_w > 0, s_w, torch.ones_like(s_w))
        shape = (-1,) + (1,) * (weight.dim() - 1)
        w_q = torch.round(weight / s_w.reshape(shape)).clamp(-qmax, qmax).to(torch.int64)
        m = (in_spec.scale * s_w / spec.scale).numpy()
        b = (bias / spec.scale).numpy()
        acc_max = w_q.reshape(w_q.shape[0], -1).abs().sum(dim=1).numpy() * x_max
        try:
            requant, bound = choose_requant(m, b, acc_max, _type(spec), self.bnrelu_bits)
        except DuccioError as err:
            raise err.locate(f"node '{node.name}'")
        self._note(node, spec.scale, requant.shift, bound)
        if kind == "linear":
            return Linear(name, source, w_q.numpy(), requant, None, bits), spec.scale
        assert isinstance(module, nn.Conv2d)
        return Conv(name, source, w_q.numpy(), _pair(module.stride), self._conv_pads(module), module.groups,
                    requant, None, bits), spec.scale

    def _conv_pads(self, conv: nn.Conv2d) -> tuple[int, int, int, int]:
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                return (0, 0, 0, 0)
            total = [k - 1 for k in conv.kernel_size]
            return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
        ph, pw = _pair(conv.padding)
        return (ph, pw, ph, pw)

    def _add(self, name: str, node: Node, spec: QuantSpec | None) -> tuple[IntLayer, float | None]:
        assert spec is not None
        inputs = sorted((self._in(a) for a in node.args[:2]), key=lambda t: -t[0])  # later layer first
        branches = []
        for _, in_spec in inputs:
            ratio = in_spec.scale / spec.scale
            for shift in range(24, -1, -1):
                mul = int(round(ratio * 2 ** shift))
                add = 1 << (shift - 1) if shift else 0
                if mul < FLOAT32_EXACT and 255 * mul + add < 1 << 31:
                    break
            branches.append(Branch(mul, add, shift, IntType(8, in_spec.signed)))
        self._note(node, spec.scale, None, 1.0)
        return Add(name, (inputs[0][0], inputs[1][0]), branches[0], branches[1], 1, 0, 0, _type(spec)), spec.scale

    def _pool(self, name: str, node: Node, kind: str, spec: QuantSpec | None) -> tuple[IntLayer, float | None]:
        assert spec is not None
        source, in_spec = self._in(node.args[0])
        kernel, stride, pads, global_ = self._pool_params(node)
        if kind == "maxpool":
            self._note(node, spec.scale, None, 0.0)
            return Pool(name, source, "max", kernel, stride, pads), spec.scale
        in_info = tensor_info(node.args[0])
        assert isinstance(in_info, TensorInfo)
        window = in_info.shape[2] * in_info.shape[3] if global_ else kernel[0] * kernel[1]
        if global_:
            kernel = stride = (in_info.shape[2], in_info.shape[3])
        ratio = in_spec.scale / (window * spec.scale)
        limit = 1 << (self.bnrelu_bits - 1)
        sum_max = window * max(abs(_type(in_spec).lo), _type(in_spec).hi)
        for shift in range(31, -1, -1):
            m = int(round(ratio * 2 ** shift))
            add = 1 << (shift - 1) if shift else 0
            if m * window < FLOAT32_EXACT and sum_max * m + add < limit:
                break
        requant = Requant(np.array(m * window, dtype=np.int64), np.array(add, dtype=np.int64), shift, _type(spec))
        self._note(node, spec.scale, shift, (sum_max + 1) / 2 ** (shift + 1) if shift else 0.5)
        return Pool(name, source, "avg", kernel, stride, pads, requant, global_), spec.scale

    def _pool_params(self, node: Node) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int, int, int], bool]:
        if node.op == "call_module":
            m = self.gm.get_submodule(str(node.target))
            if isinstance(m, nn.AdaptiveAvgPool2d):
                return (1, 1), (1, 1), (0, 0, 0, 0), True
            kernel = _pair(m.kernel_size)
            stride = _pair(m.stride if m.stride is not None else m.kernel_size)
            ph, pw = _pair(m.padding)
            return kernel, stride, (ph, pw, ph, pw), False
        if node.target in (F.max_pool2d, F.avg_pool2d):
            args = list(node.args) + [None] * 4
            kernel = _pair(args[1] if args[1] is not None else node.kwargs["kernel_size"])
            stride_arg = args[2] if args[2] is not None else node.kwargs.get("stride")
            stride = _pair(stride_arg) if stride_arg not in (None, []) else kernel
            ph, pw = _pair(args[3] if args[3] is not None else node.kwargs.get("padding", 0))
            return kernel, stride, (ph, pw, ph, pw), False
        return (1, 1), (1, 1), (0, 0, 0, 0), True  # adaptive_avg_pool2d(x, 1) or mean over (2, 3)
