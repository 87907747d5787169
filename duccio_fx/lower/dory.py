"""The DORY lowering: a float model + calibration data → the directory DORY generates GAP8 C code from.

Flow (each step a pass, visible in `--dump-ir`): trace with shapes → `remove-noops` (asserts, identity calls) →
`fold-batchnorm` → `dory-layers` (grouping, activation fusion, refusal of every op DORY cannot run, all at once)
→ `calibrate` (8-bit types and scales) → `integerize` (the `IntNet`). The float graph after these passes must
compute what the user's model computes (checked on a calibration batch), and every float figure of the report
(argmax agreement, logit error, `evaluate`'s float accuracy) is the user's unmodified model's. Then the integer executor computes the golden activations, and the emitters
write the Quantlab ONNX, its standard-ops twin, DORY's config, `input.txt`, `out_layer{i}.txt` and
`lowering.json`. Before anything is returned, onnxruntime runs the twin and must equal the executor on every
value of every layer, and the Quantlab file must read back to the same network.
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule

from duccio_fx.common.atomic import write_bytes_atomic
from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.latency import layer_cycles
from duccio_fx.costs.memory import layer_activation_bytes, layer_bytes, layer_parameter_bytes
from duccio_fx.costs.terms import evaluate, value
from duccio_fx.ir.meta import INTNET_KEY, layer_terms, source_line
from duccio_fx.ir.pass_manager import PassContext, PassManager
from duccio_fx.ir.tracer import LeafSpec, locate_errors, symbolic_trace
from duccio_fx.lower.dory_files import config_json, golden_text
from duccio_fx.lower.int_executor import output_shapes, quantize_input, run
from duccio_fx.lower.intnet import Add, Conv, IntNet, Linear, Pool
from duccio_fx.lower.pad_channels import pad_for_kernels
from duccio_fx.lower.qat import insert_fake_quant
from duccio_fx.lower.quantlab_onnx import read_quantlab, write_quantlab
from duccio_fx.lower.twin_onnx import run_twin, write_twin
from duccio_fx.passes.calibrate import Calibrate, head_layers
from duccio_fx.passes.dory_layers import DoryLayers, DoryRefusal
from duccio_fx.passes.fold_batchnorm import FoldBatchNorm
from duccio_fx.passes.integerize import Integerize, LayerNote
from duccio_fx.passes.remove_noops import RemoveNoops
from duccio_fx.pipeline import analyze, trace
from duccio_fx.targets import Target, load_target

ONNX_FILE = "network.onnx"
TWIN_FILE = "network_twin.onnx"
FLOAT_GRAPH_RTOL = 1e-3  # the float graph after the lowering's passes vs the model, relative to its largest output


@contextmanager
def _locate(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> Iterator[None]:
    """Errors about a node get the user's source line; a refusal of several ops, one for each op."""
    with locate_errors(model, leaf_modules):
        try:
            yield
        except DoryRefusal as err:
            try:
                traced = symbolic_trace(model, leaf_modules, record_stack_traces=True)
            except DuccioError:
                raise err from None
            nodes = {n.name: n for n in traced.graph.nodes}
            for problem in err.problems:
                line = source_line(nodes[problem.node]) if problem.node in nodes else ""
                if line:
                    problem.locate(line, prepend=False)
            located = DoryRefusal(err.problems)
            located.where = err.where
            located.args = (located.render(),)
            raise located from None


def _inputs_of(item: Any) -> torch.Tensor:
    """The input tensor of one loader item: `x`, `(x, y)` or `[x, y]`."""
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    raise DuccioError(f"a calibration batch is a {type(item).__name__}, not a tensor or an (inputs, labels) pair",
                      where="calibration data", fix="give a loader that yields (inputs, labels) batches")


def take_batches(data: Iterable[Any], n: int) -> list[torch.Tensor]:
    """The first `n` input batches of a loader (or one tensor)."""
    if isinstance(data, torch.Tensor):
        return [data]
    batches: list[torch.Tensor] = []
    for item in data:
        batches.append(_inputs_of(item))
        if len(batches) >= n:
            break
    return batches


def _layer_kind(layer: Any) -> str:
    if isinstance(layer, Conv):
        return "depthwise" if layer.groups > 1 else "conv"
    if isinstance(layer, Linear):
        return "linear" if layer.requant is not None else "linear (int32 head)"
    if isinstance(layer, Add):
        return "add"
    assert isinstance(layer, Pool)
    return ("global " if layer.global_ else "") + ("max" if layer.mode == "max" else "average") + " pool"


@dataclass
class DoryBundle:
    """A lowered network: the integer network, the files of the DORY directory and the report. `float_model` is
    the user's model as given (what the float figures are measured on); `graph` the lowering's float graph
    (folded, annotated with the DORY layers and scales; `graph.meta['duccio_intnet']` the network before
    channel padding)."""

    net: IntNet
    files: dict[str, bytes]
    report: dict[str, Any]
    float_model: nn.Module = field(repr=False)
    graph: GraphModule | None = field(default=None, repr=False)

    def all_files(self) -> dict[str, bytes]:
        """Every file of the DORY directory, `lowering.json` written from the current report."""
        return {**self.files, "lowering.json": (json.dumps(self.report, indent=2) + "\n").encode()}

    def save(self, directory: str | Path) -> Path:
        """Write every file atomically into `directory` (created if needed)."""
        out = Path(directory)
        for name, data in self.all_files().items():
            write_bytes_atomic(out / name, data)
        return out

    def predict_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integer network's final output for a float input batch (int64)."""
        return run(self.net, quantize_input(self.net, x))[-1]

    def evaluate(self, loader: Iterable[Any]) -> dict[str, float]:
        """Top-1 accuracy of the float model and of the integer network (the executor) on `loader`."""
        float_hits = int_hits = agree = total = 0
        model = self.float_model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            for item in loader:
                if not (isinstance(item, (tuple, list)) and len(item) == 2):
                    raise DuccioError(f"a validation batch is a {type(item).__name__}, not an (inputs, labels) pair",
                                      where="validation data", fix="give a loader that yields (inputs, labels)")
                x, y = item
                f = model(x.to(device)).argmax(dim=1).cpu()
                i = self.predict_int(x).reshape(len(x), -1).argmax(dim=1).cpu()
                float_hits += int((f == y).sum())
                int_hits += int((i == y).sum())
                agree += int((f == i).sum())
                total += len(y)
        total = max(total, 1)
        result = {"float_accuracy": float_hits / total, "integer_accuracy": int_hits / total,
                  "drop": (float_hits - int_hits) / total, "argmax_agreement": agree / total, "samples": total}
        self.report["accuracy"] = result
        return result


def _memory_rows(model: nn.Module, example: torch.Tensor, net: IntNet, shapes: list[tuple[int, ...]],
                 target: Target, leaf_modules: Sequence[LeafSpec] = ()) -> list[dict[str, Any]]:
    """Per layer: our bytes (DORY's accounting), the level DORY's tiler should pick (L2 when the whole layer fits
    L2's budget, else L3 tiling) and cycles from the target's latency model (conv/linear layers)."""
    values = {v.term.name: v for v in evaluate(layer_terms(analyze(model, example, leaf_modules)))}
    l2 = next((m for m in target.memory if m.name.upper() == "L2"), None)
    rows = []
    for i, layer in enumerate(net.layers):
        source = net.sources[i] if i < len(net.sources) else ""
        row: dict[str, Any] = {}
        v = values.get(source)
        if isinstance(layer, (Conv, Linear)) and v is not None:
            row["bytes"] = value(layer_bytes(v, target, l2))
            row["level"] = "L2" if l2 is not None and row["bytes"] <= l2.usable else "L3"
            row["cycles"] = value(layer_cycles(v, target))
            row["weight_bytes"] = value(layer_parameter_bytes(v, target, accounting=True))
            row["activation_bytes"] = value(layer_activation_bytes(v, target))
        else:
            in_bytes = sum(_tensor_bytes(net, shapes, s) for s in net.inputs_of(i))
            row["bytes"] = int(in_bytes + _tensor_bytes(net, shapes, i))
            row["level"] = "L2" if l2 is not None and row["bytes"] <= l2.usable else "L3"
            row["cycles"] = None
        rows.append(row)
    for row, (level, _) in zip(rows, _dory_l3_flow(rows, net, shapes, target)):
        row["level"] = level
    return rows


def _dory_l3_flow(rows: list[dict[str, Any]], net: IntNet, shapes: list[tuple[int, ...]],
                  target: Target) -> list[tuple[str, str | None]]:
    """Per layer, along node order: the level DORY's L3 tiler gives it, and why it gives up on it (or None).

    DORY decides on the rows' bytes (its Layer_node accounting), with two twists. A depthwise layer over the
    budget only because of the 16x weight count stays whole: the L3 solver counts the parameters once,
    double-buffered (Common/Tiler/tiler_conv2d.py:69-70,132). And a layer reads its input from L3 when the
    previous layer *in node order* wrote its output there (tiler_conv2d.py:63-65, tiler_pool2d.py:61-64; never
    for an add, tiler_add.py:61), even if it fits L2 by itself. The tiler gives up on a conv/linear that fits
    neither with weight tiles nor with output rows (tiler_conv2d.py:41-45), and on a global pool reading from L3
    (its kernel is the whole input, tiler_pool2d.py:83,111,142)."""
    l2 = next((m for m in target.memory if m.name.upper() == "L2"), None)
    if l2 is None:
        return [(row["level"], None) for row in rows]
    budget, bits = l2.usable, target.bits
    out_l3, flow = False, []
    for i, (row, layer) in enumerate(zip(rows, net.layers)):
        src = net.inputs_of(i)[0]
        c_in, *hw_in = net.input_shape if src < 0 else shapes[src]
        act = net.in_type(i).bits / 8  # bytes per input element (sub-byte activations are packed)
        in_b = c_in * int(np.prod(hw_in)) * act
        in_l3 = out_l3 and not isinstance(layer, Add)
        problem = None
        if isinstance(layer, (Conv, Linear)):
            cout = layer.weight.shape[0]
            params = (layer.weight.size * layer.weight_bits / 8
                      + (cout * bits.bias / 8 if layer.bias is not None else 0)
                      + (2 * cout * bits.requant / 8 if layer.requant is not None else 0))
            out_bits = net.out_type(i).bits  # 32 for an int32 head
            out_b = int(np.prod(shapes[i])) * out_bits / 8
            out_rows = 2 * cout * (shapes[i][2] if isinstance(layer, Conv) else 1) * out_bits / 8  # 2 output rows
            if not in_l3:
                fits = min(row["bytes"], in_b + out_b + 2 * params) <= budget
                out_l3 = not fits and in_b + out_b + 2 * params / cout > budget  # no tiling of the weights alone
                no_tiling = out_l3 and in_b + out_rows + params > budget  # nor of the output alone
            else:  # input read in double-buffered tiles of kernel-height rows
                in_rows = 2 * (c_in * layer.weight.shape[2] * hw_in[1] * act if isinstance(layer, Conv) else in_b)
                fits = False
                out_l3 = in_rows + out_b + params > budget
                no_tiling = out_l3 and in_rows + out_rows + params > budget
            if no_tiling:
                problem = ("its weights and its activations would both be L3-tiled, which DORY's tiler does not "
                           "support")
        elif isinstance(layer, Pool):
            out_b = int(np.prod(shapes[i])) * net.out_type(i).bits / 8
            fits = not in_l3 and row["bytes"] <= budget
            kernel_rows = hw_in[0] if layer.global_ else layer.kernel[0]
            out_l3 = not fits and (not in_l3 or 2 * c_in * kernel_rows * hw_in[1] * act + out_b > budget)
            if in_l3 and layer.global_:
                problem = ("a global pool would read its input from L3 (the previous layer writes its output "
                           "there), which DORY's tiler cannot do")
        else:  # an add: never reads from L3, and the refusal below covers adds beyond the budget
            fits, out_l3 = row["bytes"] <= budget, False
        flow.append(("L2" if fits else "L3", problem))
    return flow


def _tensor_bytes(net: IntNet, shapes: list[tuple[int, ...]], index: int) -> float:
    """Bytes of layer `index`'s output (the network input for -1) at its type's width, packed."""
    if index < 0:
        return int(np.prod(net.input_shape)) * net.input_type.bits / 8
    return int(np.prod(shapes[index])) * net.out_type(index).bits / 8


def _refuse_unaligned_adds(net: IntNet, shapes: list[tuple[int, ...]]) -> None:
    """Adds whose channels could not be padded (they share the network input's channels)."""
    for i, layer in enumerate(net.layers):
        if not isinstance(layer, Add):
            continue
        c, _, w = shapes[i]
        if (c * w) % 4:
            raise DuccioError(f"a residual add over {c} channels x {w} columns of the network input: DORY's add "
                              "kernel works on 4 values at a time and drops the rest", where=f"DORY layer {i} "
                              f"(from '{net.sources[i]}')",
                              fix="add to the output of a conv instead, or give the input a multiple of 4 channels")


def _refuse_l3_buffer_overflow(net: IntNet, shapes: list[tuple[int, ...]], target: Target) -> None:
    """DORY's generated code keeps fixed L3 buffers (weights, one input, one output activation) and never checks
    them: an activation or a weight total beyond them would overwrite memory on the board."""
    deployment, bits = target.deployment, target.bits
    if deployment.l3_activation_buffer:
        tensors = [(-1, int(np.prod(net.input_shape)) * bits.activations // 8)]
        tensors += [(i, int(np.prod(shape)) * net.out_type(i).bits // 8) for i, shape in enumerate(shapes)]
        for i, size in tensors:
            if size > deployment.l3_activation_buffer:
                what = "the network input" if i < 0 else f"the output of DORY layer {i} (from '{net.sources[i]}')"
                raise DuccioError(f"{what} takes {size:,} B, more than the {deployment.l3_activation_buffer:,} B L3 "
                                  f"buffer DORY's generated code keeps for one activation on {target.name}",
                                  where=what, fix="make that activation smaller (fewer channels, a smaller input "
                                                  "or an earlier stride)")
    if deployment.l3_weights_buffer:
        total = 0
        for layer in net.layers:
            if isinstance(layer, (Conv, Linear)):
                total += layer.weight.size * layer.weight_bits // 8
                total += 2 * layer.weight.shape[0] * bits.requant // 8 if layer.requant is not None else 0
                total += layer.weight.shape[0] * bits.bias // 8 if layer.bias is not None else 0
        if total > deployment.l3_weights_buffer:
            raise DuccioError(f"the weights take {total:,} B, more than the {deployment.l3_weights_buffer:,} B L3 "
                              f"buffer DORY's generated code keeps for them on {target.name}", where="all layers",
                              fix="shrink the model (a size constraint)")


def _refuse_untileable(rows: list[dict[str, Any]], net: IntNet, shapes: list[tuple[int, ...]],
                       target: Target) -> None:
    """Layers DORY's L3 tilers cannot split (they stop without generating code): a residual add that does not
    fit L2, a conv or linear whose weights and activations would both be L3-tiled, a global pool reading from L3."""
    l2 = next((m for m in target.memory if m.name.upper() == "L2"), None)
    if l2 is None:
        return
    _refuse_l3_buffer_overflow(net, shapes, target)
    flow = _dory_l3_flow(rows, net, shapes, target)
    for i, (row, layer, (_, problem)) in enumerate(zip(rows, net.layers, flow)):
        where = f"DORY layer {i} (from '{net.sources[i]}')"
        if isinstance(layer, Add) and row["bytes"] > l2.usable:
            raise DuccioError(f"a residual add of {row['bytes']:,.0f} B does not fit the {l2.usable:,} B L2 budget, "
                              f"and DORY cannot tile adds through L3", where=where,
                              fix="make the add's tensors smaller (fewer channels or a stride earlier), or give L2 "
                                  "more room (a smaller 'reserved' in the target file)")
        if row.get("weight_bytes", 0) > l2.usable and row.get("activation_bytes", 0) > l2.usable:
            raise DuccioError(f"a layer whose weights ({row['weight_bytes']:,.0f} B) and activations "
                              f"({row['activation_bytes']:,.0f} B) both exceed the {l2.usable:,} B L2 budget: "
                              "DORY's L3 tiler splits only one of them", where=where,
                              fix="shrink the layer (a size or layer-wise constraint) until one of them fits L2")
        if problem is not None:
            raise DuccioError(f"DORY cannot run this layer from L3: {problem}", where=where,
                              fix="shrink the layer or the one before it (fewer channels, or a stride earlier) until "
                                  "its activations fit the L2 budget, or give L2 more room (a smaller 'reserved' in "
                                  "the target file)")


def _require_dory(target: Target) -> None:
    if target.deployment.toolchain != "dory":
        raise DuccioError(f"target '{target.name}' has no DORY backend (its toolchain is "
                          f"'{target.deployment.toolchain or 'unset'}')", where=f"target '{target.name}'",
                          fix="lower for a DORY target (gap8, gap9), or set [deployment] toolchain = \"dory\"")


def check_lowerable(model: nn.Module, example: torch.Tensor, target: str | Path | Target = "gap8",
                    leaf_modules: Sequence[LeafSpec] = ()) -> None:
    """Raise now, before any training, if DORY cannot run `model`'s ops on `target` (the structural checks of
    `dory-layers`; sizes may still change during a search, so the lowering checks them again)."""
    target = load_target(target)
    _require_dory(target)
    model = copy.deepcopy(model).eval()
    gm = trace(model, example[:1], leaf_modules)
    with _locate(model, leaf_modules):
        PassManager([RemoveNoops(), FoldBatchNorm(), DoryLayers(target)]).run(gm)


def lower_to_dory(model: nn.Module, calib: Iterable[Any] | torch.Tensor, target: str | Path | Target = "gap8", *,
                  calib_batches: int = 8, percentile: float = 99.99, context: PassContext | None = None,
                  leaf_modules: Sequence[LeafSpec] = (), golden_input: torch.Tensor | None = None,
                  fine_tune: Callable[[nn.Module], None] | None = None, memory_checks: bool = True) -> DoryBundle:
    """Lower a float model to DORY's inputs for `target`, calibrated on the first `calib_batches` batches of
    `calib` (a loader of `(inputs, labels)` or a tensor). The model given is not modified, and the float
    figures of the report (and `DoryBundle.evaluate`) are its own outputs.

    `fine_tune(model)`, when given, trains the calibrated graph under fake quantization (quantization-aware
    fine-tuning, `lower.qat`) before it is integerized; the activation scales stay the calibrated ones.
    `memory_checks=False` skips the refusal of layers DORY's tilers cannot split or its buffers cannot hold:
    only to ask DORY itself about such a network (`benchmarks/dory_agreement.py`); it will not run."""
    target = load_target(target)
    _require_dory(target)
    batches = take_batches(calib, max(1, calib_batches))
    if not batches:
        raise DuccioError("the calibration data is empty", where="calibration data",
                          fix="give a loader with at least one batch")
    model = copy.deepcopy(model).eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = [b.to(device) for b in batches]
    example = batches[0][:1]
    context = context or PassContext()
    bnrelu_bits = target.bits.requant
    # the user's function: what every float figure is measured on (fine-tuning trains parameters the graph
    # shares with `model`, so it gets its own copy then)
    reference = copy.deepcopy(model) if fine_tune is not None else model
    gm = trace(model, example, leaf_modules, context=context)
    integerize = Integerize(bnrelu_bits=bnrelu_bits, weight_bits=target.bits.weights)
    with _locate(model, leaf_modules):  # errors about a node name the user's source line
        context.run(gm, [RemoveNoops(), FoldBatchNorm(), DoryLayers(target), Calibrate(batches, percentile)])
        with torch.no_grad():
            float_out = reference(batches[0]).float().cpu()
            graph_diff = _check_float_graph(gm(batches[0]).float().cpu(), float_out)
        if fine_tune is not None:
            remove = insert_fake_quant(gm, head_layers(gm), target.bits.weights)
            try:
                gm.train()
                fine_tune(gm)
            finally:
                gm.eval()
                remove()
        context.run(gm, [integerize])
    net: IntNet = gm.meta[INTNET_KEY]
    net.sources = [note.module or note.node for note in integerize.notes]
    net, padded = pad_for_kernels(net)  # channel counts DORY's add and sub-byte kernels can step through
    shapes = output_shapes(net)
    _refuse_unaligned_adds(net, shapes)
    memory = _memory_rows(model, example, net, shapes, target, leaf_modules)
    if memory_checks:
        _refuse_untileable(memory, net, shapes, target)

    x_float = (golden_input if golden_input is not None else batches[0][:1]).to(device)
    x_int = quantize_input(net, x_float.cpu())
    outputs = run(net, x_int)

    quantlab = write_quantlab(net, shapes)
    twin = write_twin(net, shapes)
    calib_int = quantize_input(net, batches[0].cpu())
    checks = _check(net, quantlab, twin, torch.cat([x_int, calib_int]))
    checks["float_graph_max_abs_diff"] = graph_diff
    files: dict[str, bytes] = {ONNX_FILE: quantlab, TWIN_FILE: twin}
    files["config.json"] = config_json(ONNX_FILE, code_reserved_bytes=_reserved_l2(target), bnrelu_bits=bnrelu_bits,
                                       input_bits=net.input_type.bits, input_signed=net.input_type.signed).encode()
    files["input.txt"] = golden_text("input", x_int[0].numpy()).encode()
    for i, out in enumerate(outputs):
        files[f"out_layer{i}.txt"] = golden_text(f"layer{i}", out[0].numpy()).encode()

    int_out = run(net, calib_int)[-1].double()
    head_scale = net.scales[-1] if net.scales and net.scales[-1] else 1.0
    agreement = float((float_out.reshape(len(float_out), -1).argmax(1)
                       == int_out.reshape(len(int_out), -1).argmax(1)).double().mean())
    report = _report(net, shapes, integerize.notes, memory,
                     target, bnrelu_bits, percentile, len(batches), checks)
    report["calibration_argmax_agreement"] = agreement
    report["padded_channels"] = {str(i): list(change) for i, change in padded.items()}
    if isinstance(net.layers[-1], Linear) and net.layers[-1].requant is None:  # int32 head: logits comparable
        report["calibration_max_abs_logit_error"] = float((float_out.double() - int_out * head_scale).abs().max())
    return DoryBundle(net, files, report, reference, gm)


def _check_float_graph(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference between the lowering's float graph and the user's model on a calibration batch;
    refuses when it is more than float rounding (a pass changed the function: nothing would be right after)."""
    diff = float((got.double() - want.double()).abs().max()) if got.shape == want.shape else math.inf
    if not diff <= FLOAT_GRAPH_RTOL * max(1.0, float(want.abs().max())):
        raise DuccioError(f"the float graph the lowering integerizes differs from the model by up to {diff:.3g} on a "
                          "calibration batch: a lowering pass changed what the model computes",
                          where="passes 'remove-noops', 'fold-batchnorm'",
                          fix="report this model (run with --dump-ir DIR to see the graph after each pass)")
    return diff


def _reserved_l2(target: Target) -> int:
    l2 = next((m for m in target.memory if m.name.upper() == "L2"), None)
    return int(l2.reserved) if l2 is not None else 0


def _check(net: IntNet, quantlab: bytes, twin: bytes, x_int: torch.Tensor) -> dict[str, float]:
    """On the inputs `x_int` (the golden input and a calibration batch): the Quantlab file reads back to the
    same network, and onnxruntime on the twin equals the executor on every value of every layer."""
    outputs = run(net, x_int)
    again = run(read_quantlab(quantlab, input_bits=net.input_type.bits, input_signed=net.input_type.signed), x_int)
    for i, (a, b) in enumerate(zip(again, outputs)):
        if not torch.equal(a, b):
            raise DuccioError(f"the Quantlab ONNX does not read back to the integer network (layer {i})",
                              where=f"integer layer {i}", fix="report this model")
    ort_outputs = run_twin(twin, x_int.numpy())
    worst = 0
    for i, (theirs, ours) in enumerate(zip(ort_outputs, outputs)):
        diff = int(np.abs(theirs.astype(np.int64) - ours.numpy()).max(initial=0))
        worst = max(worst, diff)
        if diff:
            raise DuccioError(f"onnxruntime on the standard-ops twin differs from the integer executor at layer {i} "
                              f"(by up to {diff})", where=f"integer layer {i}", fix="report this model")
    return {"twin_max_abs_diff": float(worst), "quantlab_round_trip": 1.0, "checked_inputs": float(len(x_int))}


def _report(net: IntNet, shapes: list[tuple[int, ...]], notes: list[LayerNote], memory: list[dict[str, Any]],
            target: Target, bnrelu_bits: int, percentile: float, n_batches: int,
            checks: dict[str, float]) -> dict[str, Any]:
    layers = []
    for i, layer in enumerate(net.layers):
        note = notes[i]
        row: dict[str, Any] = {"index": i, "name": layer.name, "kind": _layer_kind(layer), "source": note.source,
                               "inputs": list(net.inputs_of(i)), "out_shape_chw": list(shapes[i]),
                               "out_type": net.out_type(i).name, "scale": note.scale,
                               "requant_shift": note.requant_shift, "rounding_bound_lsb": note.error_bound_lsb}
        row.update(memory[i])
        layers.append(row)
    return {"target": target.name, "platform": target.deployment.platform, "bnrelu_bits": bnrelu_bits,
            "input": {"shape_chw": list(net.input_shape), "type": net.input_type.name, "scale": net.input_scale},
            "calibration": {"batches": n_batches, "percentile": percentile},
            "layers": layers, "checks": checks}

