"""fold-batchnorm never changes what the graph computes: shared convs fold per call, a BatchNorm subclass with
its own forward is folded only where that forward is known (timm's BatchNormAct2d) and refused otherwise,
and each fold is exact to float rounding (Conv1d + BatchNorm1d too)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.pass_manager import PassManager
from duccio_fx.passes.fold_batchnorm import FoldBatchNorm
from duccio_fx.pipeline import trace


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, then evaluation mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                    m.running_var.copy_(torch.rand(n, generator=g) * 2.5 + 0.2)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                    m.bias.copy_(torch.rand(n, generator=g) * 2 - 1)
    return model.eval()


def _folded(model: nn.Module, x: torch.Tensor, leaf_modules=()):
    gm = trace(model, x[:1], leaf_modules)
    PassManager([FoldBatchNorm()]).run(gm)
    return gm


def _assert_same_function(model: nn.Module, x: torch.Tensor, leaf_modules=()):
    gm = _folded(model, x, leaf_modules)
    with torch.no_grad():
        want, got = model(x), gm(x)
    diff, bound = float((got - want).abs().max()), 1e-5 * max(1.0, float(want.abs().max()))
    assert diff <= bound, f"the folded graph differs from the model by {diff:.3g}"
    return gm


def _batchnorm_calls(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), nn.modules.batchnorm._BatchNorm)]


# -- a module called more than once ---------------------------------------------------------------------------

class _SharedConv(nn.Module):
    """One conv called twice: once followed by the BatchNorm, once not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + self.conv(x * 2)


class _SharedConvAndNorm(nn.Module):
    """The same conv and the same BatchNorm, called twice as a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(self.conv(torch.relu(x)))


class _SharedNorm(nn.Module):
    """One BatchNorm after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


@pytest.mark.parametrize("model", [_SharedConv(), _SharedConvAndNorm(), _SharedNorm()],
                         ids=["conv-twice", "conv-and-norm-twice", "norm-after-two-convs"])
def test_a_module_called_twice_folds_per_call_and_every_call_stays_exact(model):
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in _stats(model).state_dict().items()}
    gm = _assert_same_function(model, torch.randn(4, 3, 10, 10))
    assert _batchnorm_calls(gm) == []  # every BatchNorm folded, into per-call copies where the conv is shared
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # user's model


def test_the_per_call_copies_report_the_module_they_were_made_from():
    from duccio_fx.passes.fold_batchnorm import FOLDED_FROM
    gm = _folded(_stats(_SharedConvAndNorm()), torch.randn(2, 3, 8, 8))
    convs = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len({n.target for n in convs}) == 2 and all(n.meta.get(FOLDED_FROM) == "conv" for n in convs)


# -- what pairs ----------------------------------------------------------------------------------------------

def test_conv1d_and_batchnorm1d_fold_exactly():
    torch.manual_seed(1)
    model = _stats(nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                                 nn.Conv1d(8, 6, 3, bias=False), nn.BatchNorm1d(6)))
    gm = _assert_same_function(model, torch.randn(3, 4, 32))
    assert _batchnorm_calls(gm) == []


class _LinearOnSequence(nn.Module):
    """A Linear on [N, L, F]: BatchNorm1d then normalises L, not the linear's outputs (L == F here)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x))


class _StdConv(nn.Conv2d):
    """A weight-standardised conv: scaling its weights does not scale its output."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("model, x", [
    (_LinearOnSequence(), torch.randn(4, 8, 8)),
    (nn.Sequential(_StdConv(3, 8, 3), nn.BatchNorm2d(8)), torch.randn(2, 3, 8, 8)),
], ids=["linear-on-a-sequence", "weight-standardised-conv"])
def test_a_batchnorm_over_other_channels_or_after_a_nonlinear_conv_is_not_folded(model, x):
    gm = _assert_same_function(_stats(model), x, leaf_modules=[_StdConv])
    assert len(_batchnorm_calls(gm)) == 1


def test_a_batchnorm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, track_running_stats=False)).eval()
    with pytest.raises(DuccioError) as info:
        _folded(model, torch.randn(2, 3, 8, 8))
    err = info.value
    assert "running statistics" in err.what and "track_running_stats=True" in (err.fix or "")
    assert err.node and "module '1'" in (err.where or "")


# -- BatchNorm subclasses kept as leaves -----------------------------------------------------------------------

class _BNReLU(nn.BatchNorm2d):
    """A BatchNorm with an activation in its forward."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_leaf_batchnorm_subclass_with_its_own_forward_is_refused_not_folded():
    model = _stats(nn.Sequential(nn.Conv2d(3, 8, 3), _BNReLU(8)))
    with pytest.raises(DuccioError) as info:
        _folded(model, torch.randn(2, 3, 8, 8), leaf_modules=[_BNReLU])
    err = info.value
    assert "_BNReLU" in err.what and err.node and "module '1'" in (err.where or "")
    assert "leaf_modules" in (err.fix or "")


def _timm_norm_act():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    pytest.importorskip("timm")
    from timm.layers.norm_act import BatchNormAct2d
    return BatchNormAct2d


def test_timm_batchnormact2d_as_a_leaf_folds_and_keeps_its_activation():
    BatchNormAct2d = _timm_norm_act()
    torch.manual_seed(2)
    model = _stats(nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU6),
                                 nn.Conv2d(8, 4, 1), BatchNormAct2d(4, act_layer=nn.ReLU)))
    gm = _assert_same_function(model, torch.randn(4, 3, 10, 10) * 3, leaf_modules=[BatchNormAct2d])
    assert _batchnorm_calls(gm) == []
    acts = [type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"]
    assert acts == [nn.Conv2d, nn.ReLU6, nn.Conv2d, nn.ReLU]
    assert all(hasattr(m, "drop") and hasattr(m, "act") for m in model if isinstance(m, BatchNormAct2d))
