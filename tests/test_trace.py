"""The tracer: shapes on every node, clear errors for untraceable models, leaf modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import duccio_fx
from duccio_fx.ir.meta import TensorInfo, tensor_info


class Branchy(nn.Module):
    """Data-dependent control flow inside a submodule: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), Branchy())
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(self.stem(x)))


def test_trace_records_shape_and_dtype_on_every_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))
    gm = duccio_fx.trace(model, torch.randn(2, 3, 7, 7))
    shapes = {n.name: tensor_info(n) for n in gm.graph.nodes if n.op != "output"}
    assert shapes["input_1"] == TensorInfo((2, 3, 7, 7), torch.float32)
    assert shapes["_0"].shape == (2, 8, 3, 3) and shapes["_1"].shape == (2, 72) and shapes["_2"].shape == (2, 4)


def test_trace_records_tuple_values():
    class M(nn.Module):
        def forward(self, x):
            a, b = x.chunk(2, dim=1)
            return a * b

    gm = duccio_fx.trace(M(), torch.randn(1, 4, 2, 2))
    chunk = next(n for n in gm.graph.nodes if n.target == "chunk")
    assert tensor_info(chunk) == (TensorInfo((1, 2, 2, 2), torch.float32),) * 2


def test_untraceable_model_names_module_and_source_line_and_suggests_a_leaf():
    with pytest.raises(duccio_fx.DuccioTraceError) as info:
        duccio_fx.trace(Outer(), torch.randn(1, 3, 4, 4))
    err = info.value
    assert "body.1" in err.where and "test_trace.py" in err.where and "if x.sum() > 0" in err.where
    assert "leaf_modules" in err.fix and "register_module" in err.fix
    assert isinstance(err.__cause__, Exception)


def test_leaf_module_by_class_or_qualified_name_makes_it_traceable():
    for leaf in (Branchy, "body.1"):
        gm = duccio_fx.trace(Outer(), torch.randn(1, 3, 4, 4), leaf_modules=[leaf])
        assert any(n.op == "call_module" and n.target == "body.1" for n in gm.graph.nodes)


def test_not_a_module_is_refused_clearly():
    with pytest.raises(duccio_fx.DuccioTraceError, match="expected a torch.nn.Module"):
        duccio_fx.trace(Outer, torch.randn(1))  # the class, not an instance


def test_wrong_example_input_names_node_and_user_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(duccio_fx.ShapePropagationError) as info:
        duccio_fx.trace(model, torch.randn(1, 3, 8, 8))
    assert "node '_2'" in info.value.where and "shape-propagation" in info.value.where
    assert "float32[1,144]" in info.value.where


def test_shape_propagation_leaves_batchnorm_statistics_and_mode_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model.train()
    before = model[1].running_mean.clone()
    duccio_fx.analyze(model, torch.randn(4, 3, 5, 5) + 3)
    assert torch.equal(model[1].running_mean, before) and model.training and model[1].training
