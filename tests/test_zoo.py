"""Every zoo model traces and analyses; MLPerf Tiny seeds have the published MACs; real architectures
get the channel groups a person would draw by hand."""

from __future__ import annotations

import pytest
import torch

import duccio_fx
from duccio_fx import zoo
from duccio_fx.ir.meta import TensorInfo, tensor_info
from duccio_fx.pipeline import graph_costs
from tests import counting
from tests.conftest import group_with
from tests.test_export_properties import hooked_costs

ALL = zoo.names()


def analysed(name: str):
    model, x = zoo.build(name)
    return model, duccio_fx.analyze(model, x)


def test_zoo_has_at_least_twelve_architectures():
    assert len(ALL) >= 12
    with pytest.raises(KeyError, match="resnet8"):
        zoo.entry("no-such-model")


@pytest.mark.parametrize("name", ALL)
def test_every_zoo_model_traces_and_analyses(name):
    model, gm = analysed(name)
    assert all(tensor_info(n) is not None for n in gm.graph.nodes if n.op in ("placeholder", "call_module"))
    groups = duccio_fx.channel_groups(gm)
    assert [g.id for g in groups] == list(range(len(groups)))
    assert any(not g.frozen for g in groups), "every zoo model has something to search"
    assert all(g.reason for g in groups if g.frozen) and not any(g.reason for g in groups if not g.frozen)
    x = zoo.build(name)[1]
    model.eval()
    gm.eval()  # its modules are a copy of the model's tree (sharing the tensors): their own train/eval flags
    with torch.no_grad():
        out, ref = gm(x), model(x)
    flat = lambda v: [t for t in (v.values() if isinstance(v, dict) else v if isinstance(v, (tuple, list)) else [v])]
    for a, b in zip(flat(out), flat(ref)):
        torch.testing.assert_close(a, b)


def totals(gm) -> tuple[int, int]:
    from duccio_fx.ir.meta import layer_cost

    costs = [layer_cost(n) for n in gm.graph.nodes]
    return sum(c.params for c in costs), sum(c.macs for c in costs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_layer_costs_what_the_independent_counters_count(name):
    """Each conv / linear layer's params and MACs, as the analysis costs them, equal those counted from the aten
    ops the model runs (tests/counting.py: modules, F.linear, F.conv2d and matmuls with a parameter alike,
    without torch.fx or duccio-fx); the totals also equal a forward-hook count over the conv / linear modules."""
    model, x = zoo.build(name, batch=1)
    model.eval()
    count = counting.count(model, x)
    assert not count.unhandled and not count.other
    costs = graph_costs(duccio_fx.analyze(model, x))
    assert counting.costed_per_layer(costs.layer_params, costs.layer_macs) == count.per_layer
    assert (int(costs.params), int(costs.macs)) == (count.params, count.macs) == hooked_costs(model, x)


@pytest.mark.parametrize("name, macs, approx", [
    ("resnet8", 12_501_632, "12.5 M"),
    ("dscnn", 2_656_768, "2.66 M"),
    ("mobilenet_v1", 7_489_664, "7.49 M"),
    ("fc_autoencoder", 264_192, "264 k"),
])
def test_mlperf_tiny_seeds_have_the_published_macs(name, macs, approx):
    model, gm = analysed(name)
    assert totals(gm)[1] == macs
    assert counting.count(model, zoo.build(name, batch=1)[1]).macs == macs  # and so does the op-level count
    value, unit = approx.split()
    scale = {"M": 1e6, "k": 1e3}[unit]
    assert f"{macs / scale:.{len(value.split('.')[-1]) if '.' in value else 0}f}" == value


def test_resnet8_weight_counts():
    model, gm = analysed("resnet8")
    conv_fc_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                                         torch.nn.Linear)))
    assert conv_fc_weights == 77_360  # MLPerf Tiny's "77 360 conv weights" for ResNet-8 counts the FC's 640 too
    assert 77_000 < totals(gm)[0] < 79_000


def test_resnet18_stem_and_layer1_second_convs_share_one_group():
    _, gm = analysed("resnet18")
    groups = duccio_fx.channel_groups(gm)
    g = group_with(groups, "conv1")
    assert set(g.producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"} and g.channels == 64
    assert not g.frozen
    assert {"bn1", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"} <= set(g.consumers)
    for stage, width in ((2, 128), (3, 256), (4, 512)):
        g = group_with(groups, f"layer{stage}.0.downsample.0")
        assert set(g.producers) == {f"layer{stage}.0.downsample.0", f"layer{stage}.0.conv2", f"layer{stage}.1.conv2"}
        assert g.channels == width
        inner = group_with(groups, f"layer{stage}.0.conv1")
        assert inner.producers == (f"layer{stage}.0.conv1",) and not inner.frozen
    assert "fc" in group_with(groups, "layer4.1.conv2").consumers
    assert group_with(groups, "fc").frozen


def test_mobilenet_v2_projections_joined_by_residual_adds_share_groups():
    _, gm = analysed("mobilenet_v2")
    groups = duccio_fx.channel_groups(gm)
    expected = [
        {"features.2.conv.2", "features.3.conv.2"},
        {"features.4.conv.2", "features.5.conv.2", "features.6.conv.2"},
        {"features.7.conv.2", "features.8.conv.2", "features.9.conv.2", "features.10.conv.2"},
        {"features.11.conv.2", "features.12.conv.2", "features.13.conv.2"},
        {"features.14.conv.2", "features.15.conv.2", "features.16.conv.2"},
    ]
    shared = [set(g.producers) for g in groups if len(g.producers) > 1]
    assert shared == expected
    # the expansion of a block and its depthwise conv share a group (depthwise follows)
    g = group_with(groups, "features.2.conv.0.0")
    assert {"features.2.conv.1.0", "features.2.conv.1.1"} <= set(g.consumers)


def test_resnet50_bottleneck_groups():
    _, gm = analysed("resnet50")
    groups = duccio_fx.channel_groups(gm)
    g = group_with(groups, "layer1.0.conv3")
    assert set(g.producers) == {"layer1.0.downsample.0", "layer1.0.conv3", "layer1.1.conv3", "layer1.2.conv3"}
    assert g.channels == 256
    assert len([g for g in groups if not g.frozen]) == 37


def test_densenet_concat_channels_keep_their_producers():
    _, gm = analysed("densenet")
    groups = duccio_fx.channel_groups(gm)
    stem = group_with(groups, "features.0")
    first_growth = group_with(groups, "features.1.conv2")
    assert stem.producers == ("features.0",) and first_growth.producers == ("features.1.conv2",)
    assert first_growth.channels == 12 and not first_growth.frozen
    # each dense layer reads every earlier layer's channels
    assert {"features.2.conv1", "features.3.conv1", "features.4.conv1"} <= set(stem.consumers)


def test_resnext_grouped_convs_are_frozen_and_residual_groups_searchable():
    _, gm = analysed("resnext")
    groups = duccio_fx.channel_groups(gm)
    assert group_with(groups, "stages.0.conv2").frozen
    assert "groups=32" in group_with(groups, "stages.0.conv1").reason
    assert not group_with(groups, "stages.0.conv3").frozen


def test_squeeze_excite_models_couple_the_excitation_with_the_features():
    _, gm = analysed("mobilenet_v3_small")
    groups = duccio_fx.channel_groups(gm)
    coupled = [g for g in groups if any(".fc2" in p or "expand" in p or "se" in p for p in g.producers)
               and len(g.producers) > 1]
    assert coupled, "SE expand convs share a group with the features they scale"
    _, gm = analysed("efficientnet_b0")
    assert any(len(g.producers) > 1 for g in duccio_fx.channel_groups(gm))


def test_tcn_mean_over_time_feeds_the_linear_head():
    _, gm = analysed("tcn")
    groups = duccio_fx.channel_groups(gm)
    head_in = [g for g in groups if "fc" in g.consumers]
    assert len(head_in) == 1 and not head_in[0].frozen


def test_two_output_model_freezes_both_outputs():
    _, gm = analysed("two_head_cnn")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert isinstance(tensor_info(out.args[0][0]), TensorInfo)
    groups = duccio_fx.channel_groups(gm)
    assert sum(1 for g in groups if g.frozen and "model output" in g.reason) == 2
