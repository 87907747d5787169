"""Each channel rule of the op registry, pinned by a small model of its own."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import duccio_fx
from duccio_fx.ir.meta import channel_layout
from tests.conftest import group_with, groups_of


def conv(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


class Residual(nn.Module):
    def __init__(self, op: str = "add") -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = conv(3, 8), conv(8, 8), conv(8, 8), conv(8, 4)
        self.op = op

    def forward(self, x):
        a = self.a(x)
        b = self.b(torch.relu(a))
        y = a + b if self.op == "add" else a - b
        return self.head(self.c(y))


@pytest.mark.parametrize("op", ["add", "sub"])
def test_residual_add_and_sub_couple_both_operands(op):
    groups = groups_of(Residual(op), torch.randn(1, 3, 8, 8))
    g = group_with(groups, "a")
    assert set(g.producers) == {"a", "b"} and not g.frozen and g.channels == 8
    assert {"b", "c"} <= set(g.consumers)
    assert group_with(groups, "c").producers == ("c",)


class SqueezeExcite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.reduce, self.expand, self.head = conv(3, 16), conv(16, 4, 1), conv(4, 16, 1), conv(16, 5)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        spatial = x.mean(1, keepdim=True)  # [N,1,H,W]: broadcast over channels, no coupling, but mixes channels
        return self.head(x * s + 0 * spatial)


def test_squeeze_excite_broadcast_multiply_couples_scale_with_features():
    groups = groups_of(SqueezeExcite(), torch.randn(2, 3, 8, 8))
    g = group_with(groups, "stem")
    assert set(g.producers) == {"stem", "expand"}
    assert group_with(groups, "reduce").producers == ("reduce",)
    # x.mean(1) reduces over channels: the group is frozen and the reason names the node
    assert g.frozen and g.reason == "Tensor.mean at node 'mean' reduces over the channel dim"


def test_squeeze_excite_without_channel_mean_is_searchable():
    class SE(SqueezeExcite):
        def forward(self, x):
            x = self.stem(x)
            return self.head(x * torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))))

    groups = groups_of(SE(), torch.randn(2, 3, 8, 8))
    g = group_with(groups, "stem")
    assert set(g.producers) == {"stem", "expand"} and not g.frozen


class NestedConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = conv(3, 4), conv(3, 6), conv(3, 5)
        self.d = conv(15, 15)
        self.head = conv(15, 2)

    def forward(self, x):
        inner = torch.cat([self.a(x), self.b(x)], dim=1)       # 4 + 6
        outer = torch.cat((inner, self.c(x)), 1)                # (4 + 6) + 5
        return self.head(outer + self.d(outer))


def test_nested_concat_maps_offsets_and_splits_the_coupled_conv():
    model = NestedConcat()
    gm = duccio_fx.analyze(model, torch.randn(1, 3, 8, 8))
    groups = duccio_fx.channel_groups(gm)
    # d is added to the concat, so d's 15 output channels split into three groups with a, b, c
    for name, width in (("a", 4), ("b", 6), ("c", 5)):
        g = group_with(groups, name)
        assert set(g.producers) == {name, "d"} and g.channels == width and not g.frozen
    members = {(m.owner, m.start, m.stop) for g in groups for m in g.members if m.owner == "d"}
    assert members == {("d", 0, 4), ("d", 4, 10), ("d", 10, 15)}
    outer = next(n for n in gm.graph.nodes if n.name == "cat_1")
    layout = channel_layout(outer)
    assert [(s.start, s.stop) for s in layout.slices] == [(0, 4), (0, 6), (0, 5)]
    assert [s.group for s in layout.slices] == [group_with(groups, k).id for k in "abc"]


class Slicing(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.stem, self.left, self.right = conv(3, 12), conv(4, 3), conv(8, 3)
        self.how = how

    def forward(self, x):
        x = self.stem(x)
        if self.how == "split":
            a, b = torch.split(x, [4, 8], dim=1)
        elif self.how == "chunk":
            a, b = x.chunk(3, dim=1)[0], torch.cat(x.chunk(3, dim=1)[1:], 1)
        elif self.how == "getitem":
            a, b = x[:, 0:4], x[:, 4:]
        else:
            a, b = x.narrow(1, 0, 4), torch.narrow(x, 1, 4, 8)
        return torch.cat([self.left(a), self.right(b)], 1)


@pytest.mark.parametrize("how", ["split", "chunk", "getitem", "narrow"])
def test_channel_slices_map_indices_and_keep_each_slice_its_own_group(how):
    groups = groups_of(Slicing(how), torch.randn(1, 3, 8, 8))
    stem = [g for g in groups if "stem" in g.producers]
    ranges = sorted((m.start, m.stop) for g in stem for m in g.members)
    assert ranges[0] == (0, 4) and ranges[-1][1] == 12
    assert all(not g.frozen for g in stem)
    left = next(g for g in stem if any(m.start == 0 for m in g.members))
    assert "left" in left.consumers and "right" not in left.consumers


def test_split_on_spatial_dim_follows():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(3, 6), conv(6, 2)

        def forward(self, x):
            top, bottom = self.a(x).split(4, dim=2)
            return self.b(top + bottom)

    groups = groups_of(M(), torch.randn(1, 3, 8, 8))
    assert not group_with(groups, "a").frozen


def test_depthwise_follows_its_input_and_consumes_it():
    model = nn.Sequential(conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), conv(8, 8, groups=8), nn.BatchNorm2d(8),
                          conv(8, 4, 1))
    groups = groups_of(model, torch.randn(1, 3, 8, 8))
    g = group_with(groups, "0")
    assert g.producers == ("0",) and {"1", "3", "4", "5"} <= set(g.consumers) and not g.frozen


def test_depthwise_multiplier_repeats_each_channel():
    model = nn.Sequential(conv(3, 4), conv(4, 8, groups=4), conv(8, 2, 1))
    gm = duccio_fx.analyze(model, torch.randn(1, 3, 8, 8))
    dw = next(n for n in gm.graph.nodes if n.target == "1")
    assert channel_layout(dw).slices[0].block == 2
    assert not group_with(duccio_fx.channel_groups(gm), "0").frozen


def test_grouped_conv_freezes_both_sides_and_says_why():
    model = nn.Sequential(conv(3, 8), conv(8, 16, groups=4), conv(16, 2, 1))
    groups = groups_of(model, torch.randn(1, 3, 8, 8))
    for producer in ("0", "1"):
        g = group_with(groups, producer)
        assert g.frozen and "grouped convolution" in g.reason and "'1'" in g.reason and "groups=4" in g.reason
    assert "1" in group_with(groups, "1").producers


@pytest.mark.parametrize("dims", [1, 2])
def test_batchnorm_1d_and_2d_follow_and_consume(dims):
    if dims == 1:
        model = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
        x = torch.randn(4, 10)
    else:
        model = nn.Sequential(conv(3, 6), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 3))
        x = torch.randn(2, 3, 8, 8)
    groups = groups_of(model, x)
    g = group_with(groups, "0")
    assert not g.frozen and g.consumers == ("1", "3")


@pytest.mark.parametrize("layer", [
    nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(2), nn.ZeroPad2d((1, 2, 0, 1)), nn.ReflectionPad2d(1),
    nn.Upsample(scale_factor=2), nn.Dropout2d(0.1), nn.Hardswish(), nn.SiLU(), nn.ReLU6(), nn.Identity(),
])
def test_per_channel_layers_follow(layer):
    model = nn.Sequential(conv(3, 6), layer, conv(6, 3))
    g = group_with(groups_of(model, torch.randn(1, 3, 8, 8)), "0")
    assert not g.frozen and g.consumers == ("2",)


@pytest.mark.parametrize("fn", [
    lambda x: F.pad(x, (1, 1, 2, 0)), lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest"),
    lambda x: F.max_pool2d(x, 2), lambda x: F.relu6(x), lambda x: x.clamp(0, 1), lambda x: x.contiguous(),
    lambda x: F.interpolate(x, size=(5, 5), mode="bilinear", align_corners=False),
])
def test_functional_per_channel_ops_follow(fn):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(3, 6), conv(6, 3)

        def forward(self, x):
            return self.b(fn(self.a(x)))

    g = group_with(groups_of(M(), torch.randn(1, 3, 8, 8)), "a")
    assert not g.frozen and g.consumers == ("b",)


def test_padding_the_channel_dim_blocks():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(3, 6), conv(8, 3)

        def forward(self, x):
            return self.b(F.pad(self.a(x), (0, 0, 0, 0, 1, 1)))

    g = group_with(groups_of(M(), torch.randn(1, 3, 8, 8)), "a")
    assert g.frozen and "changes the size of the channel dim" in g.reason


def test_flatten_into_linear_gives_each_channel_a_block_of_features():
    model = nn.Sequential(conv(3, 6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    gm = duccio_fx.analyze(model, torch.randn(2, 3, 4, 4))
    groups = duccio_fx.channel_groups(gm)
    g = group_with(groups, "0")
    assert not g.frozen and "3" in g.consumers
    flat = next(n for n in gm.graph.nodes if n.target == "2")
    lay = channel_layout(flat)
    assert lay.dim == 1 and lay.slices[0].block == 16 and lay.slices[0].stop == 6


@pytest.mark.parametrize("reshape", [
    lambda x: x.view(x.size(0), -1), lambda x: torch.flatten(x, 1), lambda x: x.reshape(x.shape[0], -1),
    lambda x: x.flatten(1),
])
def test_flatten_spellings(reshape):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = conv(3, 6), nn.Linear(6 * 16, 2)

        def forward(self, x):
            return self.fc(reshape(self.a(x)))

    g = group_with(groups_of(M(), torch.randn(2, 3, 4, 4)), "a")
    assert not g.frozen and g.consumers == ("fc",)


@pytest.mark.parametrize("reduce", [
    lambda x: x.mean((2, 3)), lambda x: x.mean(dim=[-1, -2]), lambda x: torch.mean(x, (2, 3)),
    lambda x: x.amax((2, 3)), lambda x: x.sum(-1).sum(-1), lambda x: x.mean(3, keepdim=True).mean(2),
])
def test_method_call_reductions_over_space_follow(reduce):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = conv(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            y = reduce(self.a(x))
            return self.fc(y.flatten(1))

    g = group_with(groups_of(M(), torch.randn(2, 3, 4, 1)), "a")
    assert not g.frozen and g.consumers == ("fc",)


def test_conv1d_chain_with_residual():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=2, dilation=2)
            self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            a = self.a(x)
            y = self.bn(self.b(a)) + a
            return self.fc(y.mean(-1))

    g = group_with(groups_of(M(), torch.randn(2, 4, 16)), "a")
    assert set(g.producers) == {"a", "b"} and not g.frozen and set(g.consumers) == {"b", "bn", "fc"}


def test_several_outputs_are_all_frozen():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv(3, 6), conv(6, 7), conv(6, 2)

        def forward(self, x):
            a = self.a(x)
            return {"features": self.b(a), "logits": self.c(a).mean((2, 3))}

    groups = groups_of(M(), torch.randn(1, 3, 8, 8))
    assert not group_with(groups, "a").frozen
    for out in ("b", "c"):
        g = group_with(groups, out)
        assert g.frozen and "model output" in g.reason


def test_model_inputs_are_frozen():
    groups = groups_of(nn.Sequential(conv(3, 4)), torch.randn(1, 3, 8, 8))
    g = groups[0]
    assert g.producers == ("input_1",)
    assert g.frozen and "model input" in g.reason and g.consumers == ("0",)


def test_unknown_op_freezes_what_it_touches_and_names_the_node():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = conv(3, 6), conv(6, 6), conv(6, 2)

        def forward(self, x):
            y = torch.roll(self.a(x), 1, dims=2)  # registered as blocking
            z = torch.fliplr(self.b(y))  # not in the registry at all
            return self.c(z)

    groups = groups_of(M(), torch.randn(1, 3, 8, 8))
    a, b = group_with(groups, "a"), group_with(groups, "b")
    assert a.frozen and "roll" in a.reason
    assert b.frozen and "not in the op registry" in b.reason
    assert "duccio_fx.register_function(torch.fliplr, 'follows')" in b.reason
    assert "register" in b.reason


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x) if x.sum() > -1e9 else x  # data-dependent: fx cannot trace it


def test_user_leaf_module_with_registered_rule():
    model = nn.Sequential(conv(3, 6), Swish(), conv(6, 2))
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(duccio_fx.DuccioTraceError):
        duccio_fx.analyze(model, x)
    frozen = group_with(groups_of(model, x, leaf_modules=[Swish]), "0")
    assert frozen.frozen and "Swish '1'" in frozen.reason and "register_module(Swish, 'follows')" in frozen.reason
    registry = duccio_fx.REGISTRY
    try:
        duccio_fx.register_module(Swish, "follows")
        g = group_with(groups_of(model, x), "0")
        assert not g.frozen and g.consumers == ("2",)
    finally:
        registry.modules.pop(Swish, None)
        registry.leaf_modules.discard(Swish)


def test_registering_an_unknown_role_is_refused():
    with pytest.raises(ValueError, match="unknown channel role"):
        duccio_fx.register_module(Swish, "elementwise")


def test_channel_shuffle_blocks_with_a_clear_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv(3, 8), conv(8, 2)

        def forward(self, x):
            y = self.a(x)
            n, c, h, w = y.shape
            y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
            return self.b(y)

    g = group_with(groups_of(M(), torch.randn(1, 3, 4, 4)), "a")
    assert g.frozen and "channel shuffle" in g.reason


def test_permute_to_channels_last_into_linear_follows():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.fc = conv(3, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.a(x).permute(0, 2, 3, 1)).mean((1, 2))

    g = group_with(groups_of(M(), torch.randn(1, 3, 4, 4)), "a")
    assert not g.frozen and g.consumers == ("fc",)


def test_softmax_over_channels_blocks_but_over_space_follows():
    class M(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.a, self.b, self.dim = conv(3, 8), conv(8, 2), dim

        def forward(self, x):
            return self.b(torch.softmax(self.a(x), dim=self.dim))

    assert group_with(groups_of(M(1), torch.randn(1, 3, 4, 4)), "a").frozen
    assert not group_with(groups_of(M(-1), torch.randn(1, 3, 4, 4)), "a").frozen


class _Scaled(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.a, self.b = conv(3, 8), conv(8, 2)
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, math.prod(shape)).reshape(shape))

    def forward(self, x):
        return self.b(self.a(x) * self.scale)


def test_a_per_channel_parameter_is_a_consumer_and_is_sliced_on_export():
    x = torch.randn(2, 3, 4, 4)
    g = group_with(groups_of(_Scaled((1, 8, 1, 1)), x), "a")
    assert not g.frozen and "scale" in g.consumers
    sm = duccio_fx.make_searchable(_Scaled((1, 8, 1, 1)), x)
    sm.set_masks({g.id: torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)})
    exported = sm.export().eval()
    assert tuple(exported.scale.shape) == (1, 4, 1, 1)
    assert torch.equal(exported.scale.flatten(), _Scaled((1, 8, 1, 1)).scale.flatten()[[0, 2, 3, 6]])
    torch.testing.assert_close(exported(x), sm.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_parameter_that_varies_over_positions_freezes_the_group():
    g = group_with(groups_of(_Scaled((1, 8, 4, 4)), torch.randn(1, 3, 4, 4)), "a")
    assert g.frozen and "'scale'" in g.reason


def test_layouts_match_recorded_shapes_everywhere():
    from duccio_fx import zoo
    from duccio_fx.ir.meta import ChannelLayout, TensorInfo, tensor_info

    model, x = zoo.build("densenet")
    gm = duccio_fx.analyze(model, x)
    for node in gm.graph.nodes:
        lay, info = channel_layout(node), tensor_info(node)
        if isinstance(lay, ChannelLayout):
            assert isinstance(info, TensorInfo) and sum(s.width for s in lay.slices) == info.shape[lay.dim]
