"""shape-propagation: run the graph once on the example inputs and record every value's shape and dtype.

Runs under `torch.no_grad()` with every module in eval mode, so BatchNorm running statistics and
dropout RNG of the user's model are left exactly as they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from duccio_fx.common.errors import ShapePropagationError
from duccio_fx.ir.meta import TensorInfo, ValueInfo, set_tensor_info
from duccio_fx.ir.pass_manager import Pass


def describe_value(value: Any) -> ValueInfo:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(describe_value(v) for v in value)
    return None


class _Recorder(Interpreter):
    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
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
        gm.eval()
        try:
            with torch.no_grad():
                _Recorder(gm).run(*self.example_inputs)
        finally:
            for m, training in modes.items():
                m.training = training
        return False
