"""calibrate: choose each DORY layer's 8-bit output type and scale from calibration data (post-training).

Runs the float graph on a few input batches and records, for the network input and each layer's output,
a robust range: the `percentile` of the values (of |values| for signed ones), not the maximum, so that one
outlier does not waste the 256 levels on a range nothing else uses. A fused activation bounds the range
(ReLU6 never exceeds 6).

Types follow DORY's rules: a layer whose fused activation has a lower bound ≥ 0 outputs unsigned integers
(uint8), any other signed (int8, symmetric); a residual add of two unsigned inputs stays unsigned, and its
scale is at least each input's (DORY's add kernel clips each input, moved to the output scale, to that input's
8-bit range before summing: a finer output scale would saturate the branches); max
pooling keeps its input's type and scale (it has no requantization); average pooling keeps its input's type.
The last linear layer, when it is the model's output without an activation, is the int32 head and gets no
type here. The result is a `QuantSpec` (real value = scale × integer) on each layer's output node.

Mixed precision: a conv/linear layer whose module sets an output width (`duccio_act_bits`, e.g. 4) gets that
many bits instead of 8, and one with a learned clipping range (`duccio_act_clip`, PACT's α from the search)
takes it as its range instead of the percentile. Adds and average pools output 8 bits; a max pool keeps its
input's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.fx import GraphModule, Interpreter, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import QuantSpec, dory_part, set_quant_spec
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.precision import act_bits_of, act_clip_of
from duccio_fx.passes.dory_layers import producing_layer

SAMPLES_PER_BATCH = 1 << 16  # values kept per tensor and batch for the percentile (a fixed random subset)


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule, watched: set[str], samples: dict[str, list[torch.Tensor]]) -> None:
        super().__init__(gm)
        self.watched, self.samples = watched, samples
        self.generator = torch.Generator().manual_seed(0)

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if n.name in self.watched and isinstance(result, torch.Tensor):
            flat = result.detach().reshape(-1).float().cpu()
            if flat.numel() > SAMPLES_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (SAMPLES_PER_BATCH,), generator=self.generator)]
            self.samples.setdefault(n.name, []).append(flat)
        return result


def head_layers(gm: GraphModule) -> set[int]:
    """Layers that are the int32 head: a linear layer without activation whose output is the model's."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    while isinstance(node, Node):
        part = dory_part(node)
        if part is None or part.layer >= 0 or node.op == "placeholder":
            break
        node = node.args[0] if node.args else None
    part = dory_part(node) if isinstance(node, Node) else None
    if part is not None and part.kind == "linear" and part.clamp is None:
        return {part.layer}
    return set()


@dataclass
class Calibrate(Pass):
    """Writes a `QuantSpec` on the input and on each layer's output node, from `batches` of float inputs."""

    batches: Sequence[torch.Tensor]
    percentile: float = 99.99
    bits: int = 8
    name = "calibrate"
    requires = ("dory-layers",)

    def run(self, gm: GraphModule) -> bool:
        if not self.batches:
            raise DuccioError("calibration needs at least one batch of inputs", where="pass 'calibrate'",
                              fix="give the lowering some training batches (--calib-batches N, N >= 1)")
        mains = [(n, p) for n in gm.graph.nodes if (p := dory_part(n)) is not None and p.layer >= 0 and p.output
                 and p.kind != "act"]
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
        watched = {placeholder.name} | {p.output for _, p in mains}
        samples: dict[str, list[torch.Tensor]] = {}
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    _Recorder(gm, watched, samples).run(batch)
        finally:
            gm.train(was_training)
        heads = head_layers(gm)
        specs: dict[int, QuantSpec] = {}
        input_values = torch.cat(samples[placeholder.name])
        input_spec = self._spec(input_values, signed=bool(input_values.min() < 0), clamp=None)
        set_quant_spec(placeholder, input_spec)
        nodes = {n.name: n for n in gm.graph.nodes}
        for main, part in mains:
            if part.layer in heads:
                continue
            inputs = [self._input_spec(a, specs, input_spec) for a in main.args[:2] if isinstance(a, Node)]
            values = torch.cat(samples[part.output])
            if part.kind == "maxpool":
                spec = inputs[0]
            elif part.kind == "avgpool":
                spec = self._spec(values, signed=inputs[0].signed, clamp=part.clamp)
            else:
                unsigned = (part.clamp is not None and part.clamp[0] >= 0) or (
                    part.kind == "add" and part.clamp is None and not any(s.signed for s in inputs))
                module = gm.get_submodule(str(main.target)) if main.op == "call_module" else None
                bits = (act_bits_of(module) if module is not None else None) or self.bits
                clip = act_clip_of(module) if module is not None else None
                spec = self._spec(values, signed=not unsigned, clamp=part.clamp, bits=bits, top=clip)
                if part.kind == "add":  # each branch is clipped to its input's 8-bit range at the output scale
                    spec = QuantSpec(max([spec.scale] + [s.scale for s in inputs]), spec.bits, spec.signed)
            specs[part.layer] = spec
            set_quant_spec(nodes[part.output], spec)
        return False

    def _input_spec(self, value: Node, specs: dict[int, QuantSpec], input_spec: QuantSpec) -> QuantSpec:
        layer = producing_layer(value)
        if layer is None:
            raise DuccioError(f"no quantized producer for '{value.name}'", where="pass 'calibrate'")
        return input_spec if layer < 0 else specs[layer]

    def _spec(self, values: torch.Tensor, *, signed: bool, clamp: tuple[float, float] | None,
              bits: int | None = None, top: float | None = None) -> QuantSpec:
        """`bits` wide (the pass's by default) over `top` (a learned range), else over the percentile."""
        bits = bits or self.bits
        if top is None:
            q = min(max(self.percentile / 100.0, 0.0), 1.0)
            magnitude = values.abs() if signed else values.clamp(min=0)
            top = float(torch.quantile(magnitude, q)) if magnitude.numel() else 0.0
        if clamp is not None:
            top = min(top, max(abs(clamp[0]), abs(clamp[1])) if signed else clamp[1])
        top = max(top, 1e-8)
        levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
        return QuantSpec(scale=top / levels, bits=bits, signed=signed)
