"""Layers that are not Conv/Linear module calls are costed, searched and exported like those that are.

The shapes come from the models people bring (timm's `Linear` and `BatchNormAct2d`, swin's attention, a
wrapped function given weights, `nn.MultiheadAttention`), written small here so the tests need neither timm
nor torchvision. Every cost is compared with `tests/counting.py`, which counts what the model really runs.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import duccio_fx
from duccio_fx.ir.meta import GROUPS_KEY, channel_layout, layer_terms, op_role
from counting import counted_costs


class FLinear(nn.Linear):
    """timm's `Linear`: a torch.nn.Linear subclass (so fx traces into it) calling F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class BatchNormAct(nn.BatchNorm2d):
    """timm's `BatchNormAct2d`: a shape assert, F.batch_norm on its own tensors, then an activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = BatchNormAct(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = BatchNormAct(24)
        self.fc1 = FLinear(24, 32)
        self.fc2 = FLinear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


class Attention(nn.Module):
    """swin's shape: a projection called through F.linear on another module's weight."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return F.linear(a @ v, self.proj.weight, self.proj.bias)


@torch.fx.wrap
def wrapped_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A function fx does not trace into, given weights (torchvision's shifted_window_attention)."""
    return F.linear(x, weight, bias) if x.shape[-1] > 0 else x


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.attn = Attention(16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mix = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t)
        t = t + self.mha(t, t, t, need_weights=False)[0]
        t = wrapped_projection(t, self.mix.weight, self.mix.bias)
        t = t @ self.scale
        return self.head(t.mean(1))


def _costs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    c = duccio_fx.measure_costs(model, (x,))
    return int(c.params), int(c.macs)


def test_functional_linears_and_batch_norms_become_module_calls_and_are_costed():
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    gm = duccio_fx.analyze(model, x)
    calls = {str(n.target): type(gm.get_submodule(str(n.target))).__name__
             for n in gm.graph.nodes if n.op == "call_module"}
    assert calls["fc1"] == calls["fc2"] == "Linear" and calls["bn1"] == calls["bn2"] == "BatchNorm2d"
    assert calls["bn1.act"] == "ReLU"  # the activation inside the BatchNorm subclass stays
    functions = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert F.linear not in functions and F.batch_norm not in functions
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert]
    assert asserts and all(op_role(n).role == "no-channels" for n in asserts)  # a shape check touches no channel
    assert {t.name for t in layer_terms(gm)} == {"conv1", "conv2", "fc1", "fc2"}
    assert _costs(model, x) == counted_costs(model, x)
    searchable = [g for g in gm.meta[GROUPS_KEY] if not g.frozen]
    assert sorted(g.channels for g in searchable) == [16, 24, 32]


def test_a_traced_batch_norm_follows_train_and_eval_again():
    """The trace bakes `training=` into F.batch_norm; the module call follows the mode (batch statistics while
    training, running statistics in eval), as the user's module does."""
    torch.manual_seed(0)
    model, x = Net().train(), torch.randn(4, 3, 8, 8)
    gm = duccio_fx.trace(model, x)  # traced while training: tracing counted a batch, shape propagation updated stats
    assert int(model.bn1.num_batches_tracked) == 0 and float(model.bn1.running_mean.abs().sum()) == 0
    reference = Net()
    reference.load_state_dict(model.state_dict())
    for mode in (True, False):
        gm.train(mode)
        reference.train(mode)
        torch.testing.assert_close(gm(x), reference(x))
    assert int(gm.bn1.num_batches_tracked) == int(reference.bn1.num_batches_tracked) == 1  # once a step


def test_mask_export_of_functional_layers_is_exact_and_costs_match_the_exported_model():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    sm = duccio_fx.make_searchable(model, x)
    with torch.no_grad():
        for alpha in sm.arch_parameters():
            alpha.copy_(torch.rand_like(alpha))
    sm.eval()
    small = sm.export().eval()
    torch.testing.assert_close(small(x), sm(x), atol=1e-5, rtol=1e-5)
    assert _costs(small, x) == counted_costs(small, x)
    assert _costs(small, x)[0] < _costs(model, x)[0]
    assert sm.costs().floats().params == _costs(small, x)[0]


def test_weights_behind_wrapped_functions_attention_and_matmuls_are_costed():
    """F.linear on another module's weight, a wrapped function given weights, nn.MultiheadAttention and a
    matmul with a parameter: every multiplication by the model's weights counts, exactly."""
    model, x = Tokens().eval(), torch.randn(2, 3, 16, 16)
    assert _costs(model, x) == counted_costs(model, x)
    gm = duccio_fx.analyze(model, x)
    kinds = {t.name: t.kind for t in layer_terms(gm)}
    assert kinds["attn.qkv"] == kinds["attn.proj"] == "linear"  # made module calls
    assert kinds["mha"] == kinds["wrapped_projection"] == kinds["matmul_2"] == "fixed"  # measured


def test_analysis_never_changes_the_users_model():
    """A module that caches a tensor during forward (timm's LeViT attention biases) keeps no fx Proxy, and no
    constant or mask class lands on the user's modules."""

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bias = nn.Parameter(torch.zeros(8))
            self.cache: dict[str, torch.Tensor] = {}

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if "b" not in self.cache:
                self.cache["b"] = self.bias[:, None, None] * torch.ones(1)
            return self.conv(x) + self.cache["b"]

    model, x = Cached().eval(), torch.randn(1, 3, 8, 8)
    before = dict(vars(model))
    duccio_fx.analyze(model, x)
    duccio_fx.make_searchable(model, x)
    duccio_fx.make_searchable(model, x, method="path")
    assert model.cache == {} and vars(model).keys() == before.keys() and type(model.conv) is nn.Conv2d
    model(x)
    duccio_fx.analyze(model, x)  # a second analysis, after a forward that filled the cache, still works


def test_an_unknown_op_that_reshapes_a_channels_last_tensor_keeps_its_channel_dim():
    """swin's patch merging pads H and W of an [N, H, W, C] tensor in a wrapped function: its output's
    channels stay on the last dim (frozen, naming the node), never dim 1."""

    class Merge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(pad_hw(self.inp(x.permute(0, 2, 3, 1))))

    model, x = Merge().eval(), torch.randn(1, 3, 5, 5)
    gm = duccio_fx.analyze(model, x)
    pad = next(n for n in gm.graph.nodes if n.target is pad_hw)
    assert channel_layout(pad).dim == 3
    frozen = [g for g in gm.meta[GROUPS_KEY] if g.frozen and "pad_hw" in g.reason]
    assert frozen and all("not in the op registry" in g.reason for g in frozen)


@torch.fx.wrap
def pad_hw(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))


def test_torchvision_stochastic_depth_follows_the_channels():
    """torchvision's residual-branch dropout is a wrapped function duccio-fx does not import: registered by
    name, it follows the channels instead of freezing every residual group of efficientnet, convnext, swin."""
    import sys
    import types

    import pytest

    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    ops = pytest.importorskip("torchvision.ops")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.branch = nn.Conv2d(8, 8, 3, padding=1)
            self.drop = ops.StochasticDepth(0.2, "row")
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return self.head(y + self.drop(self.branch(y)))

    gm = duccio_fx.analyze(Block().eval(), torch.randn(1, 3, 6, 6))
    assert not any("stochastic_depth" in g.reason for g in gm.meta[GROUPS_KEY])
    assert sorted(g.channels for g in gm.meta[GROUPS_KEY] if not g.frozen) == [8]


def test_a_model_in_training_mode_is_traced_in_its_inference_form():
    """Users hand over models fresh from their constructor (training mode): a traced F.batch_norm with
    `training=True` could not run shape propagation on one sample of 1x1 features, and a drop-path branch
    would stay in the graph in eval mode too. The graph keeps each module's own mode."""

    class DropPath(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.training:
                return x
            return x * (torch.rand(x.shape[0], 1, 1, 1) > 0.5) * 2

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.bn = BatchNormAct(8)
            self.drop = DropPath()
            self.fc = FLinear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.drop(self.bn(self.conv(x))).flatten(1))

    model = Pooled().train()
    gm = duccio_fx.analyze(model, torch.randn(1, 3, 3, 3))  # one sample of 1x1 features
    assert not any(n.target in (torch.rand, operator.gt) for n in gm.graph.nodes)
    assert model.training and model.bn.training and gm.training
