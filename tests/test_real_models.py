"""Real architectures (torchvision, timm; random weights, nothing downloaded) against the independent op-level
counter of `tests/counting.py`: the costs of the analysis equal what the model really runs, functional layers
(`F.linear`, `F.conv2d`, matmuls with a parameter) included, and the mask export stays exact.
`benchmarks/real_models.py` runs the same checks over every torchvision classifier and 40 timm models.

The first tests check the counter itself on hand-counted models, so that the two sides cannot be wrong together.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import duccio_fx
from duccio_fx.pipeline import graph_costs
from tests import counting


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-1 forward passes of small models: one thread is faster than two fighting over shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# the counter on hand-counted models
# --------------------------------------------------------------------------------------------------
class _Functional(nn.Module):
    """Layers called every way: F.conv2d with a module's weight, a transposed conv, a weight standardised in
    forward (timm's StdConv), F.linear on a channels-last (non-contiguous) input, `x @ w`, torch.matmul, a module
    called twice, an attention product of two activations (not a layer) and a fixed blur filter (a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.std = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(6))
        self.proj = nn.Parameter(torch.randn(6, 5))
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3, bias=False)
        self.register_buffer("blur", torch.ones(5, 1, 3, 3) / 9)

    def forward(self, x):
        y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)             # [1, 8, 6, 6]
        y = self.up(y)                                                            # [1, 4, 12, 12]
        w = (self.std - self.std.mean((1, 2, 3), keepdim=True)) / 2
        y = F.conv2d(y, w)                                                        # [1, 4, 12, 12]
        y = F.linear(y.permute(0, 2, 3, 1), self.w, self.b)                       # [1, 12, 12, 6]
        y = torch.matmul(y, self.proj)                                            # [1, 12, 12, 5]
        y = self.fc(self.fc(y))                                                   # twice
        t = y.flatten(1, 2)                                                       # [1, 144, 5]
        t = (t @ t.transpose(1, 2)).softmax(-1) @ t                               # activations only
        z = F.conv2d(t.transpose(1, 2).reshape(1, 5, 12, 12), self.blur, padding=1, groups=5)
        return self.head(z.mean((2, 3)))


def test_the_counter_sees_every_layer_however_it_is_called():
    count = counting.count(_Functional(), torch.randn(1, 3, 6, 6))
    assert count.per_layer == {
        "conv": (8 * 3 * 9 + 8, 8 * 3 * 9 * 36),
        "up": (8 * 4 * 4 + 4, 8 * 4 * 4 * 36),   # transposed: weight elements × input positions
        "std": (16, 16 * 144),
        "w": (24 + 6, 24 * 144),                  # its bias comes from F.linear, not from an addmm
        "proj": (30, 30 * 144),
        "fc": (30, 2 * 25 * 144),                 # MACs per call, weights once
        "head": (15, 15),
    }
    assert count.params == sum(p for p, _ in count.per_layer.values())
    assert count.macs == sum(m for _, m in count.per_layer.values())
    assert len(count.other) == 1 and "buffer" in count.other[0]
    assert not count.unhandled


class _ScaledStdConv(nn.Module):
    """timm's ScaledStdConv2d / nf-nets: the weight is standardised and multiplied by a per-channel gain in
    forward; the deployed conv has the weight's elements (the gain folds into it, as a BatchNorm would)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.gain = nn.Parameter(torch.ones(6, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, 6, -1), None, None, weight=self.gain.view(-1), training=True)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias) + F.conv2d(x, w.reshape_as(self.weight))


def test_a_weight_computed_from_parameters_counts_its_own_elements_once():
    count = counting.count(_ScaledStdConv(), torch.randn(1, 3, 5, 5))
    assert count.per_layer == {"weight": (6 * 27 + 6, 2 * 6 * 27 * 9)}
    assert (count.params, count.macs) == (6 * 27 + 6, 2 * 6 * 27 * 9)


def test_the_counter_runs_at_batch_one_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = counting.count(model, torch.randn(5, 3, 6, 6))
    assert (count.params, count.macs) == (4 * 27 + 4 + 64 * 2 + 2, 4 * 27 * 16 + 64 * 2)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_counter_sees_the_projections_of_multihead_attention():
    """nn.MultiheadAttention's inference fast path fuses its projections into one op: the counter turns it off."""
    e, t = 8, 5
    mha = nn.MultiheadAttention(e, 2, batch_first=True).eval()
    count = counting.count(_SelfAttention(mha), torch.randn(1, t, e))
    assert count.params == 3 * e * e + 3 * e + e * e + e
    assert count.macs == t * 3 * e * e + t * e * e
    assert torch.backends.mha.get_fastpath_enabled()


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_tied_weights_count_once():
    emb = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(emb, nn.ReLU(), nn.Linear(4, 4, bias=False))
    model[2].weight = emb.weight
    count = counting.count(model, torch.randn(1, 4))
    assert (count.params, count.macs) == (16, 32)
    assert math.prod(emb.weight.shape) == 16


# --------------------------------------------------------------------------------------------------
# real models: costs == the op-level count, exact export
# --------------------------------------------------------------------------------------------------
def _torchvision() -> Any:
    # the model definitions do not need torchvision's compiled ops, which do not load on every CPU torch build
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision")


def _timm() -> Any:
    _torchvision()  # timm imports torchvision
    return pytest.importorskip("timm")


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: _torchvision().models.get_model(name, weights=None, num_classes=10, **kw)


def _timm_model(name: str) -> Callable[[], nn.Module]:
    return lambda: _timm().create_model(name, pretrained=False, num_classes=10)


def _tiny_swin() -> nn.Module:
    """torchvision's Swin (its attention calls F.linear with the qkv / proj weights), two small stages."""
    swin = _torchvision().models.swin_transformer
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=10)


def _tiny_swin_v2() -> nn.Module:
    """torchvision's Swin V2: its attention clones the qkv bias and zeroes the key part before F.linear (a bias
    computed from a parameter), and a small MLP computes the position bias from a constant table."""
    swin = _torchvision().models.swin_transformer
    return swin.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], num_classes=10, block=swin.SwinTransformerBlockV2,
                                downsample_layer=swin.PatchMergingV2)


def _tiny_resnetv2() -> nn.Module:
    """timm's ResNetV2 (BiT): StdConv2d standardises its weight in forward and calls F.conv2d with the result."""
    _timm()
    from functools import partial

    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16, num_classes=10,
                    norm_layer=partial(GroupNormAct, num_groups=4))


def _tiny_vit() -> nn.Module:
    _timm()
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _tiny_timm_swin() -> nn.Module:
    """timm's Swin: its window attention runs nn.Linear modules on [batch × windows, tokens, C], the windows
    folded into the batch dim (4 windows here)."""
    _timm()
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2,), num_heads=(2,),
                           num_classes=10)


REAL = {  # name: (builder, input size)
    "tv_resnet18": (_tv("resnet18"), 32),
    "tv_mobilenet_v2": (_tv("mobilenet_v2", width_mult=0.5), 32),
    "tv_swin_tiny": (_tiny_swin, 32),
    "tv_swin_v2_tiny": (_tiny_swin_v2, 32),
    "timm_mobilenetv2_050": (_timm_model("mobilenetv2_050"), 32),
    "timm_efficientnet_lite0": (_timm_model("efficientnet_lite0"), 32),
    "timm_mobilenetv3_small_050": (_timm_model("mobilenetv3_small_050"), 32),  # timm.layers.Linear classifier
    "timm_resnetv2_stdconv": (_tiny_resnetv2, 32),
    "timm_vit_tiny": (_tiny_vit, 32),
    "timm_swin_windows": (_tiny_timm_swin, 32),
}
SEARCHABLE = {"timm_mobilenetv2_050": 0.9, "timm_efficientnet_lite0": 0.9}


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_models_cost_what_they_run_and_export_exactly(name):
    builder, size = REAL[name]
    torch.manual_seed(0)
    model = builder().eval()
    _randomize_bn(model)
    x = torch.randn(1, 3, size, size)
    count = counting.count(model, x)
    assert not count.unhandled, count.unhandled

    # the analysis costs every conv / linear the model runs, however it calls it (no leaf modules)
    gm = duccio_fx.analyze(model, x)
    costs = graph_costs(gm)
    diff = counting.differences(counting.costed_per_layer(costs.layer_params, costs.layer_macs), count)
    assert (int(costs.params), int(costs.macs)) == (count.params, count.macs), \
        f"costed {int(costs.params)} params, {int(costs.macs)} MACs; counted {count.params}, {count.macs}: {diff}"

    groups = duccio_fx.channel_groups(gm)
    searchable = sum(g.channels for g in groups if not g.frozen) / sum(g.channels for g in groups)
    if name in SEARCHABLE:
        frozen = [g for g in groups if g.frozen]
        assert searchable >= SEARCHABLE[name], \
            f"{searchable:.1%} searchable; {len(frozen)} frozen groups, e.g. {[g.reason[:120] for g in frozen[-3:]]}"

    # random masks: the exported model computes what the search computes, and costs what the search says
    sm = duccio_fx.make_searchable(model, x)
    gen = torch.Generator().manual_seed(1)
    sm.set_masks({g.id: torch.rand(g.channels, generator=gen) < 0.5 for g in sm.channel_groups})
    sm.eval()
    with torch.no_grad():
        want = sm(x)
    exported = sm.export().eval()
    with torch.no_grad():
        got = exported(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
    masked, after = sm.costs(), counting.count(exported, x)
    assert (int(masked["params"]), int(masked["macs"])) == (after.params, after.macs)
    if sm.channel_groups:
        assert after.params < count.params  # the masks removed something
