"""The DORY lowering: BatchNorm folding, the integer network of real models, onnxruntime on the standard-ops
twin against the executor (zoo models and generated networks), and the clear errors on what DORY cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

from duccio_fx import zoo
from duccio_fx.cli.app import app
from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.dory import lower_to_dory
from duccio_fx.lower.dory_files import read_golden
from duccio_fx.lower.int_executor import quantize_input, run
from duccio_fx.lower.intnet import Add, Conv, Linear, Pool
from duccio_fx.lower.quantlab_onnx import read_quantlab
from duccio_fx.lower.twin_onnx import run_twin
from duccio_fx.passes.fold_batchnorm import fold

runner = CliRunner()


def _warm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BatchNorms non-trivial running statistics, then switch to evaluation."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


# -- fold-batchnorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 8])
def test_folding_a_conv_batchnorm_pair_is_exact(groups):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=groups == 1), nn.BatchNorm2d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        want = bn.eval()(conv(x))
        got = fold(conv, bn)(x)
    assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))


def test_folding_a_linear_batchnorm1d_pair_is_exact():
    torch.manual_seed(1)
    lin, bn = nn.Linear(16, 8), nn.BatchNorm1d(8)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.2, 3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.allclose(fold(lin, bn.eval())(x), bn(lin(x)), atol=1e-5)


# -- real models ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, kinds", [
    ("resnet8", {"conv": 9, "add": 3, "pool": 1, "linear": 1}),
    ("dscnn", {"conv": 9, "add": 0, "pool": 1, "linear": 1}),
    ("mobilenet_v1", {"conv": 27, "add": 0, "pool": 1, "linear": 1}),
])
def test_zoo_models_lower_and_onnxruntime_agrees_on_every_layer(name, kinds, tmp_path):
    torch.manual_seed(0)
    model, example = zoo.build(name)
    calib = torch.randn(8, *example.shape[1:])
    bundle = lower_to_dory(_warm(model, calib), calib, "gap8")
    net = bundle.net
    counts = {"conv": sum(isinstance(x, Conv) for x in net.layers), "add": sum(isinstance(x, Add) for x in net.layers),
              "pool": sum(isinstance(x, Pool) for x in net.layers),
              "linear": sum(isinstance(x, Linear) for x in net.layers)}
    assert counts == kinds
    assert isinstance(net.layers[-1], Linear) and net.layers[-1].requant is None  # the int32 head
    assert bundle.report["checks"]["twin_max_abs_diff"] == 0
    # onnxruntime equals the executor on inputs other than the golden one too
    x = quantize_input(net, torch.randn(3, *example.shape[1:]) * 2)
    ours = run(net, x)
    theirs = run_twin(bundle.files["network_twin.onnx"], x.numpy())
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.array_equal(a.numpy(), b), f"layer {i}"
    out = bundle.save(tmp_path / name)
    config = json.loads((out / "config.json").read_text())
    assert config == {"onnx_file": "network.onnx", "code reserved space": 132000, "BNRelu_bits": 32,
                      "input_bits": 8, "input_signed": True, "n_inputs": 1}
    # the golden files are what the executor computes, in HWC order, one per DORY layer
    again = read_quantlab(out / "network.onnx", input_bits=8, input_signed=True)
    x0 = torch.as_tensor(read_golden(out / "input.txt")).reshape(*net.input_shape[1:], net.input_shape[0])
    outputs = run(again, x0.permute(2, 0, 1))
    for i, value in enumerate(outputs):
        golden = read_golden(out / f"out_layer{i}.txt")
        v = value[0].numpy()
        assert np.array_equal((v.transpose(1, 2, 0) if v.ndim == 3 else v).reshape(-1), golden)
    assert not (out / f"out_layer{len(outputs)}.txt").exists()
    report = json.loads((out / "lowering.json").read_text())
    assert [row["level"] for row in report["layers"]] == ["L2"] * len(net.layers)


def test_relu6_and_the_unsigned_input_are_typed_as_dory_reads_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    calib = torch.rand(8, 3, 8, 8)  # non-negative input -> uint8
    bundle = lower_to_dory(_warm(model, calib), calib, "gap8")
    net = bundle.net
    assert net.input_type.name == "uint8"
    assert [net.out_type(i).name for i in range(len(net.layers))] == ["uint8", "uint8", "int8", "int8", "int32"]
    assert bundle.report["layers"][0]["scale"] <= 6 / 255 + 1e-12  # ReLU6 bounds the range


# -- generated networks -----------------------------------------------------------------------------------

class _Block(nn.Module):
    """plain / depthwise conv; residual (identity skip, ReLU after the add); strided (1x1 strided conv skip);
    linear_add (identity skip, no activation after the add: a signed add output)."""

    def __init__(self, channels: int, kind: str, act: str) -> None:
        super().__init__()
        self.kind = kind
        groups = channels if kind == "depthwise" else 1
        stride = 2 if kind == "strided" else 1
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(channels)
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "none": nn.Identity()}[act]
        self.skip = nn.Conv2d(channels, channels, 1, stride=2) if kind == "strided" else nn.Identity()
        self.post = nn.ReLU() if kind in ("residual", "strided") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        return self.post(y + self.skip(x)) if self.kind in ("residual", "strided", "linear_add") else y


class _Net(nn.Module):
    def __init__(self, channels: int, blocks: list[tuple[str, str]], pool: str, hidden: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.Sequential(*[_Block(channels, k, a) for k, a in blocks])
        self.pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "none": nn.Identity()}[pool]
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Sequential(nn.Linear(channels, 16), nn.ReLU()) if hidden else nn.Identity()
        self.fc = nn.Linear(16 if hidden else channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(torch.flatten(self.gap(self.pool(self.blocks(self.stem(x)))), 1)))


@pytest.mark.slow
@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(channels=st.sampled_from([4, 8, 12]),
       blocks=st.lists(st.tuples(st.sampled_from(["plain", "depthwise", "residual", "strided", "linear_add"]),
                                 st.sampled_from(["relu", "relu6", "none"])), min_size=1, max_size=3),
       pool=st.sampled_from(["max", "avg", "none"]), size=st.sampled_from([16, 24]), seed=st.integers(0, 1000),
       signed_input=st.booleans(), hidden=st.booleans())
@example(channels=4, blocks=[("plain", "relu"), ("strided", "relu")], pool="max", size=24, seed=644,
         signed_input=False, hidden=True)  # found: an add whose output scale was finer than an input's saturated
def test_generated_networks_lower_and_onnxruntime_equals_the_executor(channels, blocks, pool, size, seed,
                                                                       signed_input, hidden):
    strided = sum(kind == "strided" for kind, _ in blocks)
    assume(pool == "none" or size >> (strided + 1) >= 2)  # the stem and each strided block halve the size
    torch.manual_seed(seed)
    calib = torch.randn(6, 2, size, size) if signed_input else torch.rand(6, 2, size, size)
    model = _warm(_Net(channels, blocks, pool, hidden), calib)
    bundle = lower_to_dory(model, calib, "gap8")
    net = bundle.net
    assert net.input_type.signed == signed_input
    x = quantize_input(net, calib)
    for i, (ours, theirs) in enumerate(zip(run(net, x), run_twin(bundle.files["network_twin.onnx"], x.numpy()))):
        assert np.array_equal(ours.numpy(), theirs), f"layer {i} ({type(net.layers[i]).__name__})"
    # the integer network approximates the float one: logits within a few percent of their range
    with torch.no_grad():
        want = model(calib)
    got = run(net, x)[-1].double() * bundle.net.scales[-1]
    assert float((got - want).abs().max()) <= 0.25 * float(want.abs().max()) + 1e-3


# -- what DORY cannot run ---------------------------------------------------------------------------------

class _Hardswish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.act = nn.Hardswish()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


class _Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return y * torch.sigmoid(y)


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


@pytest.mark.parametrize("model, what, fix", [
    (_Hardswish(), "Hardswish", "replace hardswish with ReLU6"),
    (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2)), "grouped conv", "make the conv depthwise or ungrouped"),
    (nn.Sequential(nn.Conv2d(4, 8, 3, dilation=2)), "dilation", "use dilation 1"),
    (_Gate(), "sigmoid", "remove the sigmoid gate"),
    (_Concat(), "cat", "remove the concatenation"),
    (nn.Sequential(nn.Conv2d(232, 8, 3)), "cannot be tiled on gap8", "fewer input channels"),
])
def test_what_dory_cannot_run_is_refused_with_node_and_fix(model, what, fix):
    cin = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
    with pytest.raises(DuccioError) as info:
        lower_to_dory(model.eval(), torch.randn(2, cin, 8, 8), "gap8")
    err = next(p for p in getattr(info.value, "problems", [info.value]) if what.lower() in p.what.lower())
    assert fix in (err.fix or "")  # a refusal of several ops (the gate: sigmoid and mul) lists each with its fix
    assert err.node and "node '" in (err.where or "")


def test_a_3x3_conv_with_224_input_channels_still_tiles():
    model = nn.Sequential(nn.Conv2d(224, 8, 3), nn.ReLU()).eval()
    lower_to_dory(model, torch.rand(1, 224, 5, 5), "gap8")


def test_a_target_without_dory_is_refused():
    with pytest.raises(DuccioError, match="has no DORY backend"):
        lower_to_dory(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8), "cortex_m7")


# -- the command line -------------------------------------------------------------------------------------

def test_cli_lower_writes_the_dory_directory_and_dumps_the_passes(tmp_path):
    out, dump = tmp_path / "dory", tmp_path / "ir"
    result = runner.invoke(app, ["lower", "zoo:dscnn", "--target", "gap8", "--out", str(out), "--dump-ir", str(dump),
                                 "--calib-batches", "2"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["network.onnx", "network_twin.onnx", "config.json", "input.txt", "lowering.json"]
                           + [f"out_layer{i}.txt" for i in range(11)])
    steps = sorted(p.stem for p in dump.iterdir())
    assert [s.split("_", 1)[1] for s in steps[-5:]] == ["remove-noops", "fold-batchnorm", "dory-layers", "calibrate",
                                                         "integerize"]
    assert "L1:conv+clip(0,inf)" in (dump / f"{steps[-1]}.txt").read_text()


def test_cli_lower_refuses_bad_input_and_writes_nothing(tmp_path):
    model_file = tmp_path / "gated.py"
    model_file.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 8, 3)\n"
        "        self.act = nn.Hardswish()\n"
        "    def forward(self, x):\n"
        "        return self.act(self.conv(x))\n\n"
        "model = Net()\nexample_input = torch.randn(1, 1, 8, 8)\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["lower", str(model_file), "--out", str(out)])
    assert result.exit_code == 1
    assert "replace hardswish with ReLU6" in result.output and "gated.py:10" in result.output
    assert not out.exists()


def test_cli_lower_refuses_a_directory_that_is_no_run(tmp_path):
    result = runner.invoke(app, ["lower", str(tmp_path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "is not a finished optimize run" in result.output


def test_quantlab_file_follows_dorys_naming():
    torch.manual_seed(0)
    model, example = zoo.build("resnet8")
    bundle = lower_to_dory(model.eval(), torch.randn(2, *example.shape[1:]), "gap8")
    import onnx

    proto = onnx.load_from_string(bundle.files["network.onnx"])
    assert proto.opset_import[0].version == 10
    names = [int(out) for node in proto.graph.node for out in node.output]
    assert names == sorted(names)  # decimal, increasing in node order
    adds = [n for n in proto.graph.node if n.op_type == "Add" and len(n.attribute) > 2]
    assert len(adds) == 3 and all(int(n.input[0]) > int(n.input[1]) for n in adds)  # later branch first


# -- integer accuracy on real data ------------------------------------------------------------------------

@pytest.mark.slow
def test_integer_accuracy_on_mnist_is_within_one_point_of_float():
    """PTQ on the README's example: 3 training epochs of the seed, calibration on 8 batches, then the integer
    executor on all 1 000 validation digits must be within 1 percentage point of the float model."""
    from duccio_fx.cli.model_file import load_model_file

    torch.manual_seed(0)  # the model file builds its weights, and its loader shuffles, from the global RNG
    spec = load_model_file(Path(__file__).parents[1] / "examples" / "mnist.py")
    model = spec.model
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for x, y in (batch for _ in range(3) for batch in spec.namespace["train_loader"]()):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    bundle = lower_to_dory(model.eval(), spec.namespace["train_loader"](), "gap8", calib_batches=8)
    acc = bundle.evaluate(spec.namespace["val_loader"]())
    assert acc["samples"] == 1000
    assert acc["float_accuracy"] > 0.85
    assert abs(acc["drop"]) <= 0.01, acc
    assert json.loads(bundle.all_files()["lowering.json"])["accuracy"] == acc


def test_a_residual_add_too_big_for_l2_is_refused():
    """DORY cannot tile an add through L3: 3 x 64x48x48 = 442 kB > 380 kB of L2 budget on gap8."""
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 64, 1), nn.Conv2d(3, 64, 1)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    with pytest.raises(DuccioError, match="DORY cannot tile adds through L3") as info:
        lower_to_dory(Big().eval(), torch.randn(1, 3, 48, 48), "gap8")
    assert "DORY layer 2" in info.value.where


def test_an_activation_beyond_dorys_fixed_l3_buffer_is_refused():
    """DORY's generated code keeps 1 500 000 B of L3 per activation on GAP8 and never checks it."""
    model = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(96, 2)).eval()
    with pytest.raises(DuccioError, match="1,572,864 B, more than the 1,500,000 B L3 buffer"):
        lower_to_dory(model, torch.rand(1, 3, 128, 128), "gap8")


def test_cli_errors_keep_their_brackets(tmp_path):
    result = runner.invoke(app, ["lower", "zoo:tcn", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "[N, C, H, W]" in result.output
    result = runner.invoke(app, ["lower", "zoo:dscnn", "--target", "cortex_m7", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "[deployment]" in result.output


def test_quantization_aware_fine_tuning_sees_the_integer_grid_and_leaves_a_plain_graph():
    from duccio_fx.lower.qat import FakeQuant

    torch.manual_seed(0)
    calib = torch.rand(6, 2, 16, 16)
    model = _warm(_Net(8, [("residual", "relu"), ("plain", "relu6")], "max", True), calib)
    seen: dict = {}

    def fine_tune(gm: nn.Module) -> None:
        fakes = [m for m in gm.modules() if isinstance(m, FakeQuant)]
        seen["fakes"] = len(fakes)
        with torch.no_grad():
            seen["out"] = gm.eval()(calib).double()
        gm.train()
        optimizer = torch.optim.Adam(gm.parameters(), 0.05)  # a step larger than the int8 grid
        gm(calib).pow(2).mean().backward()
        optimizer.step()

    untouched = lower_to_dory(model, calib, "gap8")
    bundle = lower_to_dory(model, calib, "gap8", fine_tune=fine_tune)
    assert seen["fakes"] == 8  # the input and the 7 calibrated layer outputs (the int32 head has no grid)
    assert not any(isinstance(m, FakeQuant) for m in bundle.graph.modules())
    # the float figures are the user's model's, before fine-tuning
    assert type(bundle.float_model) is type(model) and bundle.float_model is not model
    assert bundle.report["checks"]["twin_max_abs_diff"] == 0
    # before the step, the fake-quantized graph computes the integer network up to requant rounding
    x = quantize_input(untouched.net, calib)
    integer = run(untouched.net, x)[-1].double() * untouched.net.scales[-1]
    assert float((integer - seen["out"]).abs().max()) <= 0.05 * float(seen["out"].abs().max())
    # and the step changed the weights that were integerized
    assert not all(np.array_equal(a.weight, b.weight) for a, b in zip(untouched.net.layers, bundle.net.layers)
                   if isinstance(a, Conv))


def test_cli_qat_needs_training_data(tmp_path):
    result = runner.invoke(app, ["lower", "zoo:dscnn", "--qat-epochs", "1", "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "needs training data" in result.output
    assert not (tmp_path / "x").exists()


def test_adds_over_unaligned_channels_get_zero_channels_and_the_outputs_do_not_change():
    from duccio_fx.lower.pad_channels import pad_for_kernels

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
            self.conv = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
            self.dw = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(6 * 3 * 3, 4)

        def forward(self, x):
            s = self.stem(x)
            y = torch.relu(self.conv(s) + s)
            return self.fc(torch.flatten(self.pool(self.dw(y)), 1))

    torch.manual_seed(0)
    calib = torch.randn(8, 3, 14, 14)
    bundle = lower_to_dory(_warm(Net(), calib), calib, "gap8")
    assert bundle.report["padded_channels"] == {str(i): [6, 8] for i in range(5)}  # stem, conv, add, dw, pool
    net = bundle.net
    assert net.layers[3].weight.shape[0] == 8 and net.layers[5].weight.shape == (4, 8 * 3 * 3)
    # against the network before padding (kept on the graph by integerize): same values, extra zeros
    unpadded = bundle.graph.meta["duccio_intnet"]
    x = quantize_input(net, calib)
    for i, (before, after) in enumerate(zip(run(unpadded, x), run(net, x))):
        assert torch.equal(after[:, :before.shape[1]], before), f"layer {i}"
        assert not after[:, before.shape[1]:].any()
    assert pad_for_kernels(net)[1] == {}  # already aligned
    assert bundle.report["checks"]["twin_max_abs_diff"] == 0


def test_an_op_gets_its_dory_part_from_the_op_registry():
    """The lowering asks the op registry (the "dory" hook of the op's entry), so registering a user op is
    enough to lower it."""
    import duccio_fx
    from duccio_fx.passes.dory_layers import DORY_HOOK

    class Passthrough(nn.Module):  # e.g. a debugging probe the user leaves in the model
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), Passthrough(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2)).eval()
    with pytest.raises(DuccioError, match="DORY has no kernel for module Passthrough"):
        lower_to_dory(model, torch.randn(2, 3, 8, 8), "gap8", leaf_modules=[Passthrough])
    duccio_fx.register_module(Passthrough, "follows")
    duccio_fx.add_hook(Passthrough, DORY_HOOK, lambda gm, node: "none")
    bundle = lower_to_dory(model, torch.randn(2, 3, 8, 8), "gap8")
    assert len(bundle.net.layers) == 3
