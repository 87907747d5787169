"""shape-propagation: run the graph once on the example inputs and record every value's shape and dtype.

Runs under `torch.no_grad()` with every module in eval mode, and puts every buffer back afterwards (a graph
traced in training mode updates BatchNorm statistics and counters in its own ops), so the user's model is
left exactly as it was. A node that may hide conv or linear work
(a function torch.fx did not trace into, a leaf module with weights other than Conv/Linear, a call that
reads a parameter) runs under `WeightedWorkMode`, and what it measured becomes `duccio_weighted_work`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

from duccio_fx.common.errors import ShapePropagationError
from duccio_fx.ir.meta import TensorInfo, ValueInfo, set_tensor_info, set_weighted_work
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.ir.registry import REGISTRY
from duccio_fx.ir.weighted_work import WeightedWorkMode

# calls that multiply by a weight even when no parameter is a direct argument (a computed weight)
_WEIGHTED_CALLS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                   F.conv_transpose3d, torch.matmul, torch.mm, torch.bmm, torch.einsum, operator.matmul}


def describe_value(value: Any) -> ValueInfo:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(describe_value(v) for v in value)
    return None


def _may_hide_work(gm: GraphModule, n: Node) -> bool:
    """Could this node multiply by the model's weights without being a Conv/Linear module call?"""
    if n.op == "call_module":  # unknown leaves and known blocking ones (attention, RNNs); not BN, LN, PReLU
        module = gm.get_submodule(str(n.target))
        rule = REGISTRY.lookup(gm, n)
        return not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) \
            and (rule is None or rule.role == "blocks") and next(module.parameters(), None) is not None
    if n.op == "call_function":
        return n.target in _WEIGHTED_CALLS or n.target not in REGISTRY.functions \
            or any(a.op == "get_attr" for a in n.all_input_nodes)
    if n.op == "call_method":
        return n.target in ("matmul", "mm", "bmm", "addmm", "baddbmm") \
            or any(a.op == "get_attr" for a in n.all_input_nodes)
    return False


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.parameters = {p.untyped_storage().data_ptr(): name for name, p in gm.named_parameters()}
        placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
        self.batch = 1 if placeholder is None else 0

    def run_node(self, n: Node) -> Any:
        try:
            if _may_hide_work(self.module, n):
                with WeightedWorkMode(self.parameters) as mode:
                    result = super().run_node(n)
                if mode.weights or mode.macs:
                    set_weighted_work(n, mode.work(self.batch or 1))
            else:
                result = super().run_node(n)
            if n.op == "placeholder" and not self.batch and isinstance(result, torch.Tensor) and result.dim():
                self.batch = result.shape[0]
        except Exception as err:
            args = ", ".join(str(describe_value(self.env[a]) if isinstance(a, Node) else a)
                             for a in n.args)
            raise ShapePropagationError(
                f"the model failed on its example input at node '{n.name}' ({n.op} {n.target}): "
                f"{type(err).__name__}: {err}",
                where=f"node '{n.name}'" + (f" with inputs {args}" if args else ""),
                fix="check that the example input has the shape the model expects (batch dim first)",
                node=n.name,
            ) from err
        set_tensor_info(n, describe_value(result))
        return result


@dataclass
class ShapePropagation(Pass):
    """Records `duccio_tensor` (shape, dtype) on every node by running the example inputs."""

    example_inputs: tuple[Any, ...]
    name = "shape-propagation"

    def run(self, gm: GraphModule) -> bool:
        modes = {m: m.training for m in gm.modules()}
        # modules run in eval mode; only tensors the graph itself reads (a traced training-mode F.batch_norm's
        # statistics, a counter it increments) can change
        read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        buffers = [(b, b.clone()) for name, b in gm.named_buffers() if name in read]
        gm.eval()
        try:
            with torch.no_grad():
                _Recorder(gm).run(*self.example_inputs)
        finally:
            for m, training in modes.items():
                m.training = training
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        return False
