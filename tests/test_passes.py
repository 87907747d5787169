"""Pass manager, instruments and the IR printer."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import duccio_fx
from duccio_fx.passes import ChannelAnalysis, FunctionalLayers, LayerCosts, ShapePropagation
from duccio_fx import zoo
from duccio_fx.ir.tracer import symbolic_trace


def pipeline(x):
    return [ShapePropagation((x,)), FunctionalLayers(), ChannelAnalysis(), LayerCosts()]


def test_pass_names_are_kebab_case_and_match_their_files():
    import duccio_fx.passes as passes

    every = [getattr(passes, name) for name in passes.__all__]
    assert {ShapePropagation, ChannelAnalysis, LayerCosts} <= set(every) and len(every) == 17
    for cls in every:
        module = cls.__module__.rsplit(".", 1)[-1]
        assert cls.name == module.replace("_", "-")
    assert passes.__file__.replace("\\", "/").endswith("passes/__init__.py")


def test_dump_ir_writes_one_numbered_file_per_pass(tmp_path):
    model, x = zoo.build("resnet8")
    gm = symbolic_trace(model)
    timer = duccio_fx.TimePasses()
    duccio_fx.PassManager(pipeline(x), [duccio_fx.DumpIR(tmp_path), timer]).run(gm)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["000_input.txt", "001_shape-propagation.txt", "002_functional-layers.txt",
                     "003_channel-analysis.txt", "004_layer-costs.txt"]
    assert "float32[1,16,32,32]" not in (tmp_path / "000_input.txt").read_text()
    assert "float32[1,16,32,32]" in (tmp_path / "001_shape-propagation.txt").read_text()
    assert "d1:g1[0:16]" in (tmp_path / "003_channel-analysis.txt").read_text()
    assert "macs=442368" in (tmp_path / "004_layer-costs.txt").read_text()
    assert list(timer.seconds) == ["shape-propagation", "functional-layers", "channel-analysis", "layer-costs"]
    assert all(s >= 0 for s in timer.seconds.values())


def test_print_ir_between_passes():
    model, x = zoo.build("dscnn")
    stream = io.StringIO()
    duccio_fx.analyze(model, x, instruments=[duccio_fx.PrintIR(stream)])
    text = stream.getvalue()
    assert text.count("// -----") == 5 and "after functional-layers" in text and "after channel-analysis" in text


def test_printer_is_deterministic_and_shows_duccio_meta():
    outputs = []
    for _ in range(2):
        model, x = zoo.build("resnet8")
        outputs.append(duccio_fx.format_ir(duccio_fx.analyze(model, x)))
    assert outputs[0] == outputs[1]
    assert "0x" not in outputs[0]
    line = next(ln for ln in outputs[0].splitlines() if ln.strip().startswith("%add "))
    assert "operator.add(%stack1_bn2, %stack1_shortcut)" in line
    assert "couples" in line and "d1:g1[0:16]" in line and "float32[1,16,32,32]" in line


@dataclass
class Broken(duccio_fx.Pass):
    name = "broken-pass"

    def run(self, gm: GraphModule) -> bool:
        raise KeyError("boom")


@dataclass
class Renamer(duccio_fx.Pass):
    """A transform pass: replaces every ReLU module call by torch.relu."""

    name = "relu-to-function"

    def run(self, gm: GraphModule) -> bool:
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.relu, node.args)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                changed = True
        return changed


def test_failing_pass_is_named_in_the_error():
    model, x = zoo.build("lenet5")
    gm = duccio_fx.trace(model, x)
    with pytest.raises(duccio_fx.PassError) as info:
        duccio_fx.PassManager([ChannelAnalysis(), Broken()]).run(gm)
    assert "broken-pass" in str(info.value) and "step 2 of 2" in info.value.where
    assert isinstance(info.value.__cause__, KeyError)


def test_transform_pass_output_is_recompiled_and_still_runs():
    model, x = zoo.build("lenet5")
    gm = duccio_fx.trace(model, x)
    model.eval()
    gm.eval()
    assert duccio_fx.PassManager([Renamer(), ShapePropagation((x,)), ChannelAnalysis()]).run(gm)
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ReLU)
                   for n in gm.graph.nodes)
    assert sum(1 for n in gm.graph.nodes if n.target is torch.relu) == 4
    torch.testing.assert_close(gm(x), model(x))
