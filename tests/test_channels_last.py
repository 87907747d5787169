"""Channels-last blocks (ConvNeXt, MLP-Mixer, transformer feed-forward), norms over the channels, layer
scales, modules called twice, channel shuffle: what is searchable, why the rest is frozen, exact export,
and costs equal to `inspect` and to the exported model on every zoo model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import duccio_fx
from duccio_fx import zoo
from duccio_fx.cli.inspect_view import inspect_report
from tests.conftest import group_with
from tests.test_export_properties import counted_costs, randomize
from tests.test_search_export import check_exact, random_masks


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.linspace(0.2, 1.0, c))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(self.act(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.down = nn.Conv2d(16, 24, 2, stride=2)
        self.block3 = ConvNeXtBlock(24)
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.block3(self.down(self.blocks(self.stem(x))))
        return self.head(self.norm(x.mean((2, 3))))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, c: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.token1, self.token2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.channel1, self.channel2 = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)

    def forward(self, x):  # [N, tokens, C]
        y = self.norm1(x).transpose(1, 2)  # [N, C, tokens]: the token MLP mixes the last dim, not channels
        x = x + self.token2(torch.relu(self.token1(y))).transpose(1, 2)
        return x + self.channel2(torch.nn.functional.gelu(self.channel1(self.norm2(x))))


class MixerLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 12, 4, stride=4)
        self.blocks = nn.Sequential(MixerBlock(4, 12), MixerBlock(4, 12))
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


class TemporalTransformerFF(nn.Module):
    """A 1-D temporal model: conv front end, transposed to [N, T, C], post-norm feed-forward blocks on the
    last dim (no LayerNorm before the first, so its input channels stay searchable), and a conv back end."""

    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(4, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.ff1 = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Dropout(0.1), nn.Linear(40, 20))
        self.ff2 = nn.Sequential(nn.Linear(20, 32), nn.GELU(), nn.Linear(32, 20))
        self.norm = nn.LayerNorm(20)
        self.back = nn.Conv1d(20, 8, 1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [N, 4, T]
        h = torch.relu(self.bn(self.front(x))).transpose(1, 2)
        h = self.ff1(h)
        h = self.norm(h + self.ff2(h))
        return self.head(self.back(h.transpose(1, 2)).mean(-1))


MODELS = {"convnext": (ConvNeXtLike, (2, 3, 16, 16)), "mixer": (MixerLike, (2, 3, 8, 8)),
          "temporal": (TemporalTransformerFF, (2, 4, 12))}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    randomize(model, 0, add_biases=False)
    for m in model.modules():  # non-trivial LayerNorm affine parameters too
        if isinstance(m, nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model, torch.randn(*shape)


def test_convnext_mlp_hidden_groups_are_searchable_and_the_normalised_stream_says_why():
    model, x = build("convnext")
    sm = duccio_fx.make_searchable(model, x)
    for fc1 in ("blocks.0.fc1", "blocks.1.fc1", "block3.fc1"):
        hidden = group_with(sm.all_groups, fc1)
        assert not hidden.frozen and hidden.channels == 4 * (24 if fc1.startswith("block3") else 16)
    stream = group_with(sm.all_groups, "stem")
    assert stream.frozen and "normalises over the channels" in stream.reason
    assert {"blocks.0.fc2", "blocks.1.fc2"} <= set(stream.producers)  # the residual adds couple them
    assert "multiplies the last dim" not in " ".join(g.reason for g in sm.all_groups)


def test_mixer_channel_mlp_is_searchable_and_the_token_mlp_passes_the_channels_through():
    model, x = build("mixer")
    sm = duccio_fx.make_searchable(model, x)
    for i in (0, 1):
        assert not group_with(sm.all_groups, f"blocks.{i}.channel1").frozen
    stream = group_with(sm.all_groups, "patch")
    assert stream.frozen and "'blocks.0.token1'" in stream.reason and "mixes dim 2" in stream.reason


def test_temporal_feed_forward_is_searchable_up_to_the_layer_norm():
    model, x = build("temporal")
    sm = duccio_fx.make_searchable(model, x)
    front, hidden1 = group_with(sm.all_groups, "front"), group_with(sm.all_groups, "ff1.0")
    assert not front.frozen and {"bn", "ff1.0"} <= set(front.consumers)
    assert not hidden1.frozen and not group_with(sm.all_groups, "ff2.0").frozen
    assert group_with(sm.all_groups, "ff1.3").frozen  # the residual stream the LayerNorm normalises


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_models_export_exactly_with_exact_costs(name):
    model, x = build(name)
    sm = duccio_fx.make_searchable(model, x)
    assert sm.channel_groups
    for seed, keep in ((1, 0.5), (2, 0.2), (3, 0.9)):
        sm.set_masks(random_masks(sm, seed, keep))
        check_exact(sm, x)
        exported = sm.export().eval()
        costs = sm.costs()
        assert (int(costs["params"]), int(costs["macs"])) == counted_costs(exported, x)


def _inspect_totals(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    totals = inspect_report(duccio_fx.analyze(model, x), "test")["totals"]
    return totals["params"], totals["macs"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS) + zoo.names())
def test_costs_equal_inspect_and_the_exported_model_with_every_layer_counted(name):
    """Every conv and linear counts, searchable or frozen: costs() == inspect == counts on the model."""
    if name in MODELS:
        model, x = build(name)
    else:
        model, x = zoo.build(name, batch=1)
        model.eval()
    sm = duccio_fx.make_searchable(model, x)
    costs = sm.costs()
    counted = counted_costs(model, x)
    assert (int(costs["params"]), int(costs["macs"])) == counted
    assert _inspect_totals(model, x) == counted


class _SharedConv(nn.Module):
    """One conv called twice (weights shared), and one ReLU module called three times."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.a(x))
        x = self.relu(self.b(x))
        return self.head(self.relu(self.b(x)).mean((2, 3)))


def test_a_module_called_twice_stores_its_weights_once_and_counts_its_macs_per_call():
    x = torch.randn(1, 3, 8, 8)
    sm = duccio_fx.make_searchable(_SharedConv(), x)
    costs = sm.costs("gap8").floats()
    assert (int(costs["params"]), int(costs["macs"])) == counted_costs(_SharedConv(), x) == (844, 87584)
    assert set(costs.layer_macs) == {"a", "b", "b#2", "head"}
    assert float(costs.layer_macs["b#2"]) == float(costs.layer_macs["b"]) == 8 * 8 * 9 * 64
    assert float(costs.layer_params["b#2"]) == float(costs.layer_size_bytes["b#2"]) == 0
    assert float(costs.layer_size_bytes["b"]) > 0 and float(costs.layer_bytes["b#2"]) > 0  # it still needs them
    group = group_with(sm.all_groups, "b")  # both calls read and write the same channels
    assert not group.frozen and set(group.producers) == {"a", "b"}
    sm.set_masks({group.id: torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)})
    exported = check_exact(sm, x)
    assert exported.b.out_channels == exported.b.in_channels == 5


class _GroupNorms(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 3), nn.GroupNorm(groups, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def test_group_norm_with_one_channel_per_group_is_sliced_and_larger_groups_stay():
    x = torch.randn(2, 3, 6, 6)
    frozen = group_with(duccio_fx.make_searchable(_GroupNorms(2), x).all_groups, "a")
    assert frozen.frozen and "4 channels per group" in frozen.reason
    model = _GroupNorms(8)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-1, 1)
    sm = duccio_fx.make_searchable(model, x)
    group = group_with(sm.all_groups, "a")
    assert not group.frozen
    sm.set_masks({group.id: torch.tensor([0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)})
    exported = check_exact(sm, x)
    assert exported.norm.num_groups == exported.norm.num_channels == 5


def test_channel_shuffle_says_precisely_why_its_channels_stay():
    model, x = zoo.build("shufflenet_like", batch=1)
    reasons = " ".join(g.reason for g in duccio_fx.make_searchable(model, x).all_groups)
    assert "a channel shuffle or attention heads" in reasons and "same number kept in every part" in reasons


class _ScaleTwice(nn.Module):
    """One per-channel scale applied to two branches with different producers: they share its channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 6, 3), nn.Conv2d(3, 6, 3), nn.Conv2d(12, 2, 1)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6).view(1, 6, 1, 1))

    def forward(self, x):
        return self.head(torch.cat([self.a(x) * self.scale, self.b(x) * self.scale], 1))


def test_a_per_channel_parameter_used_twice_couples_its_users():
    x = torch.randn(2, 3, 6, 6)
    sm = duccio_fx.make_searchable(_ScaleTwice(), x)
    group = group_with(sm.all_groups, "a")
    assert not group.frozen and set(group.producers) == {"a", "b"}
    sm.set_masks({group.id: torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)})
    exported = check_exact(sm, x)
    assert tuple(exported.scale.shape) == (1, 3, 1, 1) and exported.head.in_channels == 6
