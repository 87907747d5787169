"""The `onnx` backend: float ONNX of an exported model (torch.onnx, simplified with onnxsim, checked against
PyTorch with onnxruntime)."""

from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.lower.backend import Lowered, register_backend
from duccio_fx.targets import Target


def to_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], *, opset: int = 13,
            atol: float = 1e-4) -> tuple[bytes, float]:
    """The simplified ONNX bytes and the largest |onnxruntime − torch| difference on `example_inputs`.

    Inputs are named `input` (`input0`, `input1`, ... for several) and outputs `output` (`output0`, ...),
    with a dynamic batch dim (`batch`), checked at batch 1 and 2; a model that only runs at batch 1 (e.g. a
    `view(1, -1)`) keeps a fixed batch of 1. Raises when onnxruntime disagrees with torch beyond `atol`
    (relative to the output scale), so a wrong file is never written.
    """
    import onnx  # the ONNX stack loads in about 0.5 s: only when a model is exported, not at every command
    import onnxsim

    model = model.eval()
    inputs = tuple(x[:1] for x in example_inputs)
    with torch.no_grad():
        outputs = _flat(model(*inputs))
    names = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    out_names = [f"output{i}" if len(outputs) > 1 else "output" for i in range(len(outputs))]
    pair = tuple(torch.cat([x, x.flip(0) * 0.5]) for x in inputs)  # batch 2: the batch dim really is free
    dynamic = _runs(model, pair)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, inputs, buffer, opset_version=opset, dynamo=False, input_names=names,
                          output_names=out_names, do_constant_folding=True,
                          dynamic_axes={n: {0: "batch"} for n in names + out_names} if dynamic else None)
    proto = onnx.load_from_string(buffer.getvalue())
    simplified, ok = onnxsim.simplify(proto)
    if ok:
        proto = simplified
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    diff = _check(data, model, inputs, names)
    if dynamic:
        diff = max(diff, _check(data, model, pair, names))
    scale = max(float(o.abs().max()) for o in outputs) or 1.0
    if diff > atol * max(1.0, scale):
        raise DuccioError(f"the ONNX export differs from the PyTorch model by {diff:.3g}",
                          where="ONNX export (onnxruntime check)",
                          fix="report this model: an op may export differently from how PyTorch runs it")
    return data, diff


def _runs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> bool:
    """Does the model run on these inputs (a batch of 2)?"""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception:  # any failure means the batch is fixed in the model's code
        return False
    return True


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _flat(v)]


def _check(data: bytes, model: nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str]) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()  # no spinning workers: they would slow the torch work that follows
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {n: x.detach().cpu().numpy() for n, x in zip(names, inputs)})
    with torch.no_grad():
        want = _flat(model(*inputs))
    return max(float((torch.as_tensor(g) - w.detach().cpu()).abs().max()) for g, w in zip(got, want))


@register_backend("onnx")
def lower_onnx(model: nn.Module, example_inputs: Sequence[torch.Tensor], target: Target | None,
               context: PassContext) -> Lowered:
    """`model.onnx`, checked against PyTorch (`onnx_max_abs_diff`)."""
    data, diff = to_onnx(model, example_inputs)
    return Lowered({"model.onnx": data}, {"onnx_max_abs_diff": diff})
