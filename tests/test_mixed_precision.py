"""Mixed precision: per-layer weight widths in the costs, the precision search of the mask method, its export,
fine-tuning and DORY lowering (integer executor == standard-ops twin at 2 and 4 bits), and what is refused."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx.cli.app import app
from duccio_fx.common.errors import DuccioError
from duccio_fx.costs.pulp_tiled import PulpConstants, weight_unpacking
from duccio_fx.ir.precision import (act_bits_of, act_clip_of, bake_weight_bits, fake_quant_weight,
                                    fake_quantize_weights, set_act_bits, set_weight_bits, weight_bits_of)
from duccio_fx.lower.dory import lower_to_dory
from duccio_fx.lower.int_executor import quantize_input, run
from duccio_fx.lower.intnet import Conv, Linear
from duccio_fx.lower.quantlab_onnx import read_quantlab
from duccio_fx.lower.twin_onnx import run_twin
from duccio_fx.pipeline import analyze, graph_costs
from duccio_fx.search.precision import bake_precision
from duccio_fx.targets import load_target
from tests.test_export_properties import randomize
from tests.test_lowering import _warm
from tests.test_properties import EVERY_BLOCK, build, plans

runner = CliRunner()
GAP8 = load_target("gap8")


class Net(nn.Module):
    """A stem on the 2-channel input, two 3x3 convs, a pointwise one, pooling, a hidden linear and a head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(2 * c, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw(self.conv2(self.conv1(self.stem(x))))
        return self.fc(self.hidden(torch.flatten(self.pool(x), 1)))


def _costs(model: nn.Module, x: torch.Tensor):
    return graph_costs(analyze(model, x[:1]), GAP8)


# -- costs ------------------------------------------------------------------------------------------------

def test_a_layers_weight_bits_set_its_bytes_and_its_kernel_cycles():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 16, 16)
    model = Net().eval()
    base = _costs(model, x)
    set_weight_bits(model, {"conv2.0": 4, "pw.0": 2})
    mixed = _costs(model, x)
    conv2 = 16 * 16 * 9  # weights of conv2
    assert base.layer_size_bytes["conv2.0"] - mixed.layer_size_bytes["conv2.0"] == conv2 - conv2 * 4 / 8
    assert base.layer_size_bytes["pw.0"] - mixed.layer_size_bytes["pw.0"] == 16 * 16 * (1 - 2 / 8)
    assert mixed.layer_size_bytes["stem.0"] == base.layer_size_bytes["stem.0"]  # untouched layers keep theirs
    assert mixed.size_bytes == sum(mixed.layer_size_bytes.values())
    # pulp-nn-mixed unpacks sub-byte weights before its 8-bit dot products: slower, not faster
    assert mixed.layer_cycles["conv2.0"] > base.layer_cycles["conv2.0"]
    assert mixed.layer_cycles["stem.0"] == base.layer_cycles["stem.0"]


def test_the_unpacking_slowdown_is_the_kernel_counts_at_2_4_8_bits_and_linear_between():
    k = PulpConstants()
    assert weight_unpacking(8, k) == 1.0
    assert weight_unpacking(4, k) == pytest.approx(40 / 14)
    assert weight_unpacking(2, k) == pytest.approx(39 / 14)
    bits = torch.tensor([2.0, 3.0, 4.0, 6.0, 8.0], dtype=torch.float64, requires_grad=True)
    got = weight_unpacking(bits, k)
    assert torch.allclose(got, torch.tensor([39, 39.5, 40, 27, 14], dtype=torch.float64) / 14)
    got.sum().backward()
    assert bits.grad[1] > 0 > bits.grad[3]  # the slope of each segment


def test_set_weight_bits_refuses_unknown_layers_and_widths():
    model = Net()
    with pytest.raises(DuccioError, match="not a conv/linear"):
        set_weight_bits(model, {"pool": 4})
    with pytest.raises(DuccioError, match="3 is not a bit width"):
        set_weight_bits(model, {"conv2.0": 3})
    set_weight_bits(model, 4)
    assert {weight_bits_of(m) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))} == {4}


# -- the precision search ----------------------------------------------------------------------------------

def _space(channels: bool = True, c: int = 8):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 16, 16)
    return duccio_fx.make_searchable(_warm(Net(c), x), x[:2], bits=(2, 4, 8), channels=channels), x


def test_the_search_excludes_the_head_and_bars_widths_the_input_cannot_pack_with_reasons():
    sm, _ = _space()
    assert sm.precision.layers == ["stem.0", "conv1.0", "conv2.0", "pw.0", "hidden.0"]
    assert "head" in sm.bits_excluded["fc"]
    # the stem reads the 2-channel input: 18 weights per output channel fill whole bytes at 8 and 4 bits,
    # not at 2, and the input cannot be padded: it searches between 8 and 4
    assert sm.precision.barred[0].tolist() == [False, False, True]
    assert not sm.precision.barred[1:].any()
    with torch.no_grad():
        sm.precision.theta[0] = torch.tensor([0.0, 0.0, 9.0])
    assert sm.weight_bits()["stem.0"] == 8  # a barred width is never chosen
    sm3 = duccio_fx.make_searchable(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)),
                                    torch.randn(1, 1, 8, 8), bits=(2, 4, 8))
    assert sm3.precision is None and "model's input" in sm3.bits_excluded["0"]
    dw = duccio_fx.make_searchable(nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                                                 nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(),
                                                 nn.Linear(8 * 36, 3)), torch.randn(1, 4, 8, 8), bits=(2, 4, 8))
    assert dw.precision.layers == ["0", "2", "4"]  # depthwise: between 8 and 4 bits
    assert dw.precision.barred.tolist() == [[False, False, False], [False, False, True], [False, False, False]]
    only2 = duccio_fx.make_searchable(nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8),
                                                    nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3)),
                                      torch.randn(1, 4, 8, 8), bits=(2, 8))
    assert "depthwise" in only2.bits_excluded["2"]


def test_an_untrained_bank_runs_the_widest_width_and_theta_gets_gradients_from_task_and_costs():
    sm, x = _space()
    assert set(sm.weight_bits().values()) == {8}
    sm.train()
    y = sm(x)
    costs = sm.costs(GAP8)
    (y.square().mean() + 1e-4 * costs["size_bytes"]).backward()
    grad = sm.precision.theta.grad
    assert grad is not None and bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_costs_of_the_chosen_precisions_equal_the_exported_models_and_the_export_is_exact():
    sm, x = _space()
    with torch.no_grad():
        sm.precision.theta.copy_(torch.tensor([[0, 5, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0]],
                                              dtype=torch.float32))
        sm.bank.alpha[:3] = -1.0  # drop three channels of the first group
    assert sm.weight_bits() == {"stem.0": 4, "conv1.0": 4, "conv2.0": 2, "pw.0": 8, "hidden.0": 4}
    sm.eval()
    want = sm.cost_values(GAP8)
    exported = sm.export()
    assert {n: weight_bits_of(m) for n, m in exported.named_modules() if weight_bits_of(m)} == sm.weight_bits()
    fake_quantize_weights(exported)  # what fine-tuning trains: the same function as the search model's
    with torch.no_grad():
        assert torch.allclose(exported(x), sm(x), atol=1e-5)
    bake_weight_bits(exported)
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in exported.modules() if hasattr(m, "weight")
               and isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        assert torch.allclose(exported(x), sm(x), atol=1e-5)
    got = _costs(exported, x)
    for key in ("size_bytes", "params", "macs", "cycles"):
        assert got[key] == want[key], key
    assert dict(got.layer_bytes) == dict(want.layer_bytes)
    for name, bits in sm.weight_bits().items():  # baked weights lie on their grids
        w = exported.get_submodule(name).weight
        assert torch.equal(w, fake_quant_weight(w, bits))


def test_a_precision_only_space_keeps_every_channel_and_trains_no_alpha():
    sm, x = _space(channels=False)
    assert [p is sm.precision.theta for p in sm.arch_parameters()] == [True]
    assert not sm.bank.alpha.requires_grad
    smallest = sm.minimum_costs(GAP8)
    assert smallest.macs == sm.cost_values(GAP8).macs  # the widths change, the channels do not
    assert smallest.layer_size_bytes["conv2.0"] == 16 * 16 * 9 * 2 / 8 + 16 * 2 * 4  # 2-bit weights + k, l
    with pytest.raises(DuccioError, match="nothing to search"):
        duccio_fx.make_searchable(Net(), x[:1], channels=False)


def test_a_bits_space_pickles_and_keeps_its_choice():
    sm, x = _space()
    with torch.no_grad():
        sm.precision.theta[:, 1] = 1.0
    buffer = io.BytesIO()
    torch.save(sm, buffer)
    buffer.seek(0)
    back = torch.load(buffer, weights_only=False)
    assert back.weight_bits() == sm.weight_bits()
    assert back.cost_values(GAP8).size_bytes == sm.cost_values(GAP8).size_bytes


def test_optimize_with_bits_meets_a_bound_channels_alone_could_not_and_reports_the_widths(tmp_path):
    sm, x = _space()
    bound = 0.3 * sm.cost_values(GAP8).size_bytes
    from duccio_fx.search.constraints import Constraint
    from duccio_fx.search.recipe import optimize
    from duccio_fx.search.settings import SearchSettings
    data = [(x, torch.randint(0, 5, (8,)))] * 4
    settings = SearchSettings(warmup_epochs=1, search_epochs=4, finetune_epochs=1, method="mask",
                              method_options={"bits": [2, 4, 8]}, bn_recalibration_batches=0, arch_lr=0.2)
    result = optimize(_warm(Net(), x), (x[:1],), data, data, [Constraint.parse("size", f"{bound:.0f}B")],
                      target=GAP8, settings=settings, loss_fn=nn.functional.cross_entropy)
    assert result.met
    bits = {n: weight_bits_of(m) for n, m in result.model.named_modules() if weight_bits_of(m)}
    assert min(bits.values()) < 8
    assert result.final_costs.size_bytes <= bound


def test_activation_widths_are_searched_where_dory_requantizes_and_export_costs_and_lowering_agree():
    torch.manual_seed(0)
    x = torch.rand(8, 2, 16, 16)
    sm = duccio_fx.make_searchable(_warm(Net(8), x), x[:2], bits=(2, 4, 8), act_bits=(2, 4, 8))
    assert sm.act_precision.layers == ["stem.0", "conv1.0", "conv2.0", "pw.0", "hidden.0"]
    assert "head" in sm.act_excluded["fc"]
    assert sm.act_reads == {"conv1.0": "stem.0", "conv2.0": "conv1.0", "pw.0": "conv2.0", "fc": "hidden.0"}
    quants = dict(sm.graph_module.get_submodule("duccio_act_quant").items())
    assert sorted(quants) == ["conv1_2", "conv2_2", "hidden_1", "pw_2", "stem_2"]  # after each BN + ReLU
    assert not any(q.signed for q in quants.values())
    sm.train()
    y = sm(x)
    assert all(q._ready and float(q.alpha.detach()) > 0 for q in quants.values())  # α from the first batch
    costs = sm.costs(GAP8)
    (y.square().mean() + 1e-4 * sum(costs.layer_bytes.values())).backward()
    assert float(sm.act_precision.theta.grad.abs().sum()) > 0
    assert all(q.alpha.grad is not None for q in quants.values())
    with torch.no_grad():
        sm.act_precision.theta.copy_(torch.tensor([[0, 5, 0], [0, 0, 5], [0, 5, 0], [5, 0, 0], [0, 5, 0]]))
        sm.precision.theta[:, 1] = 1.0
    assert sm.act_bits() == {"stem.0": 4, "conv1.0": 2, "conv2.0": 4, "pw.0": 8, "hidden.0": 4}
    sm.eval()
    want = sm.cost_values(GAP8)
    exported = sm.export()
    fake_quantize_weights(exported)
    with torch.no_grad():
        assert torch.equal(exported(x), sm(x))  # fine-tuning starts from the searched function
    bake_precision(exported)
    assert not hasattr(exported, "duccio_act_quant")
    assert {n: act_bits_of(m) for n, m in exported.named_modules() if act_bits_of(m)} == sm.act_bits()
    assert act_clip_of(exported.get_submodule("conv1.0")) == pytest.approx(float(quants["conv1_2"].alpha.detach()))
    got = _costs(exported, x)
    assert dict(got.layer_bytes) == dict(want.layer_bytes) and got.cycles == want.cycles
    bundle = lower_to_dory(exported, x, "gap8")
    net = bundle.net
    assert [net.out_type(i).bits for i in range(len(net.layers))] == [4, 2, 4, 8, 8, 4, 32]
    convs = [layer for layer in net.layers if isinstance(layer, Conv)]  # the learned range is the calibrated one
    assert net.scales[1] == pytest.approx(act_clip_of(exported.get_submodule("conv1.0")) / 3)
    assert len(convs) == 4
    smallest = sm.minimum_costs(GAP8)
    assert smallest.layer_bytes["conv2.0"] < want.layer_bytes["conv2.0"]


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.conv1(x)
        y = torch.relu(self.bn2(self.conv2(skip)) + skip)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_a_residual_branch_quantizes_signed_before_the_add_and_alpha_survives_a_state_dict():
    torch.manual_seed(1)
    x = torch.randn(4, 4, 8, 8)
    sm = duccio_fx.make_searchable(_Residual(), x[:1], act_bits=(4, 8), channels=False)
    quants = dict(sm.graph_module.get_submodule("duccio_act_quant").items())
    assert {k: q.signed for k, q in quants.items()} == {"conv1_2": False, "bn2": True}  # conv2 + BN, then the add
    sm.train()
    sm(x)
    fresh = duccio_fx.make_searchable(_Residual(), x[:1], act_bits=(4, 8), channels=False)
    fresh.load_state_dict(sm.state_dict())
    fresh.train()
    fresh(x * 10)  # a loaded α is not re-initialized from the data
    for key, q in dict(fresh.graph_module.get_submodule("duccio_act_quant").items()).items():
        assert float(q.alpha.detach()) == float(quants[key].alpha.detach())
    buffer = io.BytesIO()
    torch.save(sm, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).act_bits() == sm.act_bits()


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans(), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_random_networks_export_the_chosen_widths_with_exactly_the_costs_the_search_saw(plan, seed, data):
    """Generated networks (residuals, concats, depthwise, SE, flatten heads), random masks and random widths:
    the exported model computes what the search model computes, and its own costs equal the search's."""
    model, x = build(plan)
    randomize(model, seed, add_biases=True)

    def picks(n: int) -> list[int]:
        return data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))

    def mask(g: duccio_fx.ChannelGroup) -> torch.Tensor:
        return torch.tensor(data.draw(st.lists(st.booleans(), min_size=g.channels, max_size=g.channels)))

    _check_widths_export(model, x, picks, mask)


def test_every_block_plan_at_sub_byte_widths():
    """Guards against vacuity: the rich plan searches many layers' widths, all at 2/4 bits, with real pruning."""
    model, x = build(EVERY_BLOCK)
    randomize(model, 1, add_biases=True)
    sm = _check_widths_export(model, x, lambda n: [2] * n, lambda g: torch.arange(g.channels) % 2 == 1)
    assert len(sm.precision.layers) >= 8 and len(sm.act_precision.layers) >= 10
    assert min(sm.weight_bits().values()) <= 4 and max(sm.act_bits().values()) == 2


def _check_widths_export(model: nn.Module, x: torch.Tensor, picks, mask) -> duccio_fx.SearchableModel:
    sm = duccio_fx.make_searchable(model, x[:1], bits=(2, 4, 8), act_bits=(2, 4, 8))
    sm.train()
    with torch.no_grad():
        sm(x)  # the activation ranges start from a batch
        for bank in (sm.precision, sm.act_precision):
            if bank is not None:
                chosen = torch.tensor(picks(len(bank.layers)), dtype=torch.long)
                bank.theta.copy_(torch.nn.functional.one_hot(chosen, 3).float())
    if sm.bank is not None:
        sm.set_masks({g.id: mask(g) for g in sm.channel_groups})
    sm.eval()
    want = sm.cost_values(GAP8)
    exported = sm.export()
    fake_quantize_weights(exported)
    with torch.no_grad():
        a, b = exported(x), sm(x)
    assert torch.allclose(a, b, atol=1e-5 * max(1.0, float(b.abs().max()))), float((a - b).abs().max())
    bake_precision(exported)
    got = _costs(exported, x)
    for key in ("params", "macs", "size_bytes"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    # (a depthwise conv cut to one channel is an ordinary conv in the exported model, with that kernel's
    # cycles and DORY's byte accounting of it: a known difference of the seed's layer kinds, not of the widths)
    depthwise = {t.name for t in sm.terms if t.kind == "depthwise"}
    single = {n for n, m in exported.named_modules()
              if isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == 1 and n in depthwise}
    for table in ("layer_bytes", "layer_cycles"):
        ours = {n: v for n, v in dict(getattr(got, table)).items() if n not in single}
        assert ours == pytest.approx({n: getattr(want, table)[n] for n in ours}, rel=1e-12), table
    return sm


# -- lowering ----------------------------------------------------------------------------------------------

@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.lists(st.sampled_from([2, 4, 8]), min_size=3, max_size=3),
       act=st.lists(st.sampled_from([2, 4, 8]), min_size=4, max_size=4), c=st.sampled_from([3, 6, 8]),
       seed=st.integers(0, 1000))
def test_random_bit_assignments_lower_exactly_executor_equals_twin(bits, act, c, seed):
    torch.manual_seed(seed)
    calib = torch.rand(6, 2, 12, 12)
    model = _warm(Net(c), calib)
    layers = ["conv1.0", "conv2.0", "pw.0"]
    set_weight_bits(model, dict(zip(layers, bits)))
    set_act_bits(model, dict(zip(["stem.0", *layers], act)))
    bake_weight_bits(model)
    bundle = lower_to_dory(model, calib, "gap8")
    net = bundle.net
    convs = [layer for layer in net.layers if isinstance(layer, Conv)]
    assert [layer.weight_bits for layer in convs] == [8, *bits]  # the stem was not set
    assert [layer.requant.out.bits for layer in convs] == act
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Conv):  # the integers fit their widths; every output channel's weights and
            qmax = (1 << (layer.weight_bits - 1)) - 1  # every pixel's channels fill whole bytes (padded)
            assert np.abs(layer.weight).max() <= qmax
            assert (layer.weight[0].size * layer.weight_bits) % 8 == 0 or layer.input == -1
            assert (layer.weight.shape[0] * layer.requant.out.bits) % 8 == 0
    x = quantize_input(net, calib)
    for i, (ours, theirs) in enumerate(zip(run(net, x), run_twin(bundle.files["network_twin.onnx"], x.numpy()))):
        assert np.array_equal(ours.numpy(), theirs), f"layer {i}"
    back = read_quantlab(bundle.files["network.onnx"])
    assert [getattr(L, "weight_bits", None) for L in back.layers] == [getattr(L, "weight_bits", None)
                                                                     for L in net.layers]
    assert [back.out_type(i) for i in range(len(back.layers))] == [net.out_type(i) for i in range(len(net.layers))]
    if min(act) == 8:  # (at 2-bit activations the float and integer networks are far apart by design)
        with torch.no_grad():
            want = model(calib)
        got = run(net, x)[-1].double() * net.scales[-1]
        assert float((got - want).abs().max()) <= 0.25 * float(want.abs().max()) + 1e-3


def test_a_layers_output_bits_set_its_activation_bytes_and_the_lowerings_types():
    torch.manual_seed(0)
    calib = torch.rand(6, 2, 12, 12)
    model = _warm(Net(6), calib)
    base = _costs(model, calib)
    set_act_bits(model, {"conv1.0": 4, "conv2.0": 2, "hidden.0": 4})
    mixed = _costs(model, calib)
    out1, in2 = 12 * 6 * 6, 12 * 6 * 6  # conv1's output elements = conv2's input elements
    assert base.layer_bytes["conv1.0"] - mixed.layer_bytes["conv1.0"] == out1 * (1 - 4 / 8)
    assert base.layer_bytes["conv2.0"] - mixed.layer_bytes["conv2.0"] == in2 * (1 - 4 / 8) + in2 * (1 - 2 / 8)
    assert base.layer_bytes["fc"] - mixed.layer_bytes["fc"] == 16 * (1 - 4 / 8)  # its input: hidden's output
    assert mixed.layer_bytes["stem.0"] == base.layer_bytes["stem.0"]
    bundle = lower_to_dory(model, calib, "gap8")
    net = bundle.net
    assert [net.out_type(i).name for i in range(len(net.layers))] == ["uint8", "uint4", "uint2", "uint8", "uint8",
                                                                      "uint4", "int32"]
    rows = bundle.report["layers"]
    for i, name in enumerate(["stem.0", "conv1.0", "conv2.0", "pw.0"]):
        assert rows[i]["bytes"] == mixed.layer_bytes[name]
    assert rows[4]["bytes"] == 16 * 6 * 6 + 16  # the pool: its input and output at 8 bits


def test_channels_are_padded_so_sub_byte_weights_pack_and_the_outputs_do_not_change():
    torch.manual_seed(3)
    calib = torch.rand(4, 2, 12, 12)
    model = _warm(Net(c=3), calib)  # conv1 reads 3 channels: 27 weights per output channel
    set_weight_bits(model, {"conv1.0": 2})
    bake_weight_bits(model)
    bundle = lower_to_dory(model, calib, "gap8")
    conv1 = [layer for layer in bundle.net.layers if isinstance(layer, Conv)][1]
    assert conv1.weight.shape[1] == 4 and not conv1.weight[:, 3].any()  # a zero input channel
    assert bundle.report["padded_channels"] == {"0": [3, 4]}
    with torch.no_grad():  # the same logits as the float model, up to quantization
        want = model(calib)
    got = run(bundle.net, quantize_input(bundle.net, calib))[-1].double() * bundle.net.scales[-1]
    assert float((got - want).abs().max()) <= 0.25 * float(want.abs().max()) + 1e-3


def test_sub_byte_weights_on_the_network_input_are_refused_naming_the_layer():
    model = _warm(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)),
                  torch.rand(4, 1, 8, 8))
    set_weight_bits(model, {"0": 2})
    with pytest.raises(DuccioError) as info:
        lower_to_dory(model, torch.rand(4, 1, 8, 8), "gap8")
    assert "2-bit weights" in info.value.what and "input cannot be padded" in info.value.what
    assert "8 bits" in info.value.fix


class _DwNet(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pw1 = nn.Sequential(nn.Conv2d(4, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c), nn.ReLU())
        self.pw2 = nn.Sequential(nn.Conv2d(c, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.pw2(self.dw(self.pw1(x))), 1), 1))


def test_4_bit_depthwise_weights_lower_with_an_even_channel_count_and_2_bit_ones_are_refused():
    torch.manual_seed(5)
    calib = torch.rand(4, 4, 10, 10)
    model = _warm(_DwNet(5), calib)
    set_weight_bits(model, {"dw.0": 4})
    bake_weight_bits(model)
    bundle = lower_to_dory(model, calib, "gap8")
    dw = [layer for layer in bundle.net.layers if isinstance(layer, Conv) and layer.groups > 1][0]
    assert dw.weight_bits == 4 and dw.weight.shape[0] == 6  # 5 channels padded to 6: two 4-bit filters a byte
    x = quantize_input(bundle.net, calib)
    for ours, theirs in zip(run(bundle.net, x), run_twin(bundle.files["network_twin.onnx"], x.numpy())):
        assert np.array_equal(ours.numpy(), theirs)
    set_weight_bits(model, {"dw.0": 2})
    with pytest.raises(DuccioError, match="2-bit depthwise weights"):
        lower_to_dory(model, calib, "gap8")


# -- command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--bits", "2,3"], "3 is not a bit width"),
    (["--bits", "2,x"], "not a list of whole numbers"),
    (["--bits-only"], "--bits-only needs --bits"),
    (["--bits", "4,8", "--method", "path"], "--bits belongs to the mask method"),
    (["--act-bits", "4,8", "--method", "path"], "--act-bits belongs to the mask method"),
    (["--act-bits", "5"], "5 is not a bit width"),
])
def test_cli_refuses_bad_bits_options(args, message, tmp_path):
    model = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"
    result = runner.invoke(app, ["optimize", str(model), "--target", "gap8", "--max-size", "50%",
                                 "--out", str(tmp_path / "run"), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_sweep_refuses_bits_with_the_path_method_before_running(tmp_path):
    model = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"
    result = runner.invoke(app, ["sweep", str(model), "--method", "mask,path", "--bits", "4,8",
                                 "--out", str(tmp_path / "sweep")], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "--bits belongs to the mask method" in " ".join(result.output.split())
    assert not (tmp_path / "sweep").exists()


def test_per_layer_width_rules_fix_or_narrow_layers_and_a_rule_matching_nothing_is_refused():
    torch.manual_seed(0)
    x = torch.rand(4, 2, 16, 16)
    sm = duccio_fx.make_searchable(Net(8), x[:1], bits=["2,4,8", "conv*=4,8", "pw.0=2"], act_bits=["4,8", "pw.0=8"])
    allowed = {name: [b for b, no in zip(sm.precision.widths, row) if not no]
               for name, row in zip(sm.precision.layers, sm.precision.barred.tolist())}
    assert allowed == {"stem.0": [8, 4], "conv1.0": [8, 4], "conv2.0": [8, 4], "pw.0": [2], "hidden.0": [8, 4, 2]}
    assert sm.weight_bits()["pw.0"] == 2  # one width: fixed there
    assert sm.act_precision.widths == (8, 4) and sm.act_bits()["pw.0"] == 8
    with pytest.raises(DuccioError, match="'stage9.*' matches no layer"):
        duccio_fx.make_searchable(Net(8), x[:1], bits=["2,4,8", "stage9.*=4"])
    with pytest.raises(DuccioError, match="no default widths"):
        duccio_fx.make_searchable(Net(8), x[:1], bits=["conv*=4"])


def test_cli_takes_repeated_bits_rules(tmp_path):
    model = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"
    result = runner.invoke(app, ["optimize", str(model), "--target", "gap8", "--max-size", "50%", "--bits", "2,4,8",
                                 "--bits", "stage9.*=4", "--out", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "matches no layer whose width is searched" in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


# -- the real DORY --------------------------------------------------------------------------------------------

DORY_CHECK = os.environ.get("DORY_CHECK")


@pytest.mark.skipif(not (DORY_CHECK and os.environ.get("DORY_VENV")),
                    reason="set DORY_CHECK (path of check_dory.py) and DORY_VENV to run the real DORY")
def test_real_dory_accepts_mixed_weights_and_activations_and_counts_their_bytes_as_we_do(tmp_path):
    from dory_probes import run_checker
    torch.manual_seed(0)
    calib = torch.rand(4, 2, 12, 12)
    model = _warm(Net(c=6), calib)
    set_weight_bits(model, {"conv1.0": 4, "conv2.0": 2, "pw.0": 4, "hidden.0": 2})
    set_act_bits(model, {"conv1.0": 4, "conv2.0": 2, "pw.0": 4, "hidden.0": 4})
    bake_weight_bits(model)
    bundle = lower_to_dory(model, calib, "gap8")
    costs = _costs(model, calib)
    bundle.save(tmp_path / "mixed")
    rc, result, log = run_checker(str(DORY_CHECK), tmp_path / "mixed", tmp_path / "mixed.json")
    assert rc == 0 and result["accepted"] is True, log
    weighted = [L for L in result["layers"] if L["bits"]["weight"] is not None]
    ours = [L for L in bundle.net.layers if isinstance(L, (Conv, Linear))]
    assert [L["bits"]["weight"] for L in weighted] == [L.weight_bits for L in ours]
    for theirs, layer in zip(weighted, ours):
        assert theirs["memory_bytes"]["weights"] == layer.weight.size * layer.weight_bits // 8
    assert [L["bits"]["out"] for L in result["layers"]] == [8, 4, 2, 4, 8, 4, 32]
    # DORY's per-layer bytes (its Layer_node accounting) are our costs' layer_bytes, at every width
    for theirs, name in zip(weighted, ["stem.0", "conv1.0", "conv2.0", "pw.0", "hidden.0", "fc"]):
        assert sum(v or 0 for v in theirs["memory_bytes"].values()) == costs.layer_bytes[name], name


@pytest.mark.skipif(not (DORY_CHECK and os.environ.get("DORY_VENV")),
                    reason="set DORY_CHECK (path of check_dory.py) and DORY_VENV to run the real DORY")
def test_real_dory_accepts_a_padded_4_bit_depthwise_layer(tmp_path):
    from dory_probes import run_checker
    torch.manual_seed(5)
    calib = torch.rand(4, 4, 10, 10)
    model = _warm(_DwNet(5), calib)
    set_weight_bits(model, {"dw.0": 4, "pw2.0": 2})
    bake_weight_bits(model)
    lower_to_dory(model, calib, "gap8").save(tmp_path / "dw")
    rc, result, log = run_checker(str(DORY_CHECK), tmp_path / "dw", tmp_path / "dw.json")
    assert rc == 0 and result["accepted"] is True, log
    assert [L["bits"]["weight"] for L in result["layers"] if L["bits"]["weight"] is not None] == [8, 4, 2, 8]
