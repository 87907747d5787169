"""The DORY lowering keeps the user's function and says so with the user's model's numbers: asserts, shape reads
and identity calls are no-ops, leaf modules reach every analysis, the report's float figures are the unmodified
model's, a pass that changed the function is caught, and a refusal lists every op DORY cannot run at once."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.dory import check_lowerable, lower_to_dory
from duccio_fx.lower.int_executor import quantize_input, run
from duccio_fx.passes import fold_batchnorm
from tests.test_fold_batchnorm import _stats  # non-trivial BatchNorm statistics, eval mode

HERE = __file__.rsplit("/", 1)[-1]


def _timm():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("timm")


# -- no-ops -------------------------------------------------------------------------------------------------

class _Checked(nn.Module):
    """Shape asserts on the input (as timm's blocks have) and an identity between the BatchNorm and the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.drop, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Identity(), \
            nn.ReLU()
        self.conv2, self.skip = nn.Conv2d(8, 8, 3, padding=1), nn.Identity()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        torch._assert(x.dim() == 4, "a 4-D input")
        torch._assert(x.shape[1] == 3, "3 channels")
        torch._assert(x.size(2) == x.size(3), "a square image")
        torch._assert(getattr(x, "ndim") == 4, "4 dims")
        torch._assert(x.dtype == torch.float32, "float32")
        y = self.act(self.drop(self.bn(self.conv(x))))
        y = self.skip(torch.relu(self.conv2(y)) + y)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_asserts_shape_reads_and_identity_calls_are_no_ops():
    torch.manual_seed(0)
    model = _stats(_Checked())
    x = torch.rand(16, 3, 12, 12)
    bundle = lower_to_dory(model, x, "gap8")
    assert [type(layer).__name__ for layer in bundle.net.layers] == ["Conv", "Conv", "Add", "Pool", "Linear"]
    assert bundle.report["checks"]["float_graph_max_abs_diff"] <= 1e-5
    with torch.no_grad():
        want = model(x)
    head = bundle.net.scales[-1]
    got = run(bundle.net, quantize_input(bundle.net, x))[-1].double() * head
    assert float((got - want.double()).abs().max()) <= 0.1 * float(want.abs().max())  # 8-bit, close to float


def test_a_timm_resnet_lowers():
    _timm()
    from timm.models.resnet import BasicBlock, ResNet
    torch.manual_seed(0)
    model = _stats(ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, stem_width=8, channels=(8, 16, 16, 32)))
    x = torch.rand(4, 3, 32, 32)
    bundle = lower_to_dory(model, x, "gap8")
    kinds = [type(layer).__name__ for layer in bundle.net.layers]
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert kinds.count("Conv") == convs and kinds.count("Add") == 4 and kinds[-1] == "Linear"
    assert bundle.report["checks"]["float_graph_max_abs_diff"] <= 1e-4


# -- the report's float figures are the user's model's ------------------------------------------------------

class _BNReLU(nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


def _net(norm: type[nn.Module], **kw) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8, **kw), nn.Conv2d(8, 8, 3, stride=2),
                         norm(8, **kw), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))


def test_a_leaf_batchnorm_with_its_own_forward_is_refused_by_the_lowering():
    model = _stats(_net(_BNReLU))
    with pytest.raises(DuccioError) as info:
        lower_to_dory(model, torch.rand(4, 3, 8, 8), "gap8", leaf_modules=[_BNReLU])
    err = info.value
    assert "_BNReLU" in err.what and "node '" in (err.where or "") and "leaf_modules" in (err.fix or "")
    with pytest.raises(DuccioError, match="_BNReLU"):  # optimize --dory's check before training, too
        check_lowerable(model, torch.rand(1, 3, 8, 8), "gap8", [_BNReLU])


def test_the_reports_float_figures_are_the_users_model_with_a_timm_batchnormact_leaf():
    _timm()
    from timm.layers.norm_act import BatchNormAct2d
    torch.manual_seed(3)
    model = _stats(_net(BatchNormAct2d, act_layer=nn.ReLU6))
    x = torch.rand(64, 3, 8, 8) * 4
    bundle = lower_to_dory(model, x, "gap8", leaf_modules=[BatchNormAct2d])
    assert type(bundle.float_model) is nn.Sequential  # the user's model, not the lowering's graph
    with torch.no_grad():
        want = model(x)
    got = run(bundle.net, quantize_input(bundle.net, x))[-1]
    agreement = float((want.argmax(1) == got.reshape(len(x), -1).argmax(1)).double().mean())
    assert bundle.report["calibration_argmax_agreement"] == agreement
    err = float((want.double() - got.double() * bundle.net.scales[-1]).abs().max())
    assert bundle.report["calibration_max_abs_logit_error"] == pytest.approx(err, rel=1e-6)
    assert err <= 0.1 * float(want.abs().max())  # the activations are there: the integer network is the model
    y = want.argmax(1)
    result = bundle.evaluate([(x, y)])
    assert result["float_accuracy"] == 1.0 and result["argmax_agreement"] == agreement


def test_a_pass_that_changes_the_function_is_caught(monkeypatch):
    monkeypatch.setattr(fold_batchnorm, "fold", lambda layer, bn: copy.deepcopy(layer))  # "forgets" the BN
    model = _stats(_net(nn.BatchNorm2d))
    with pytest.raises(DuccioError, match="differs from the model"):
        lower_to_dory(model, torch.rand(4, 3, 8, 8), "gap8")


# -- leaf modules reach every analysis ----------------------------------------------------------------------

class _CheckedReLU(nn.ReLU):
    """A ReLU torch.fx cannot trace into (it branches on a traced value): only usable as a leaf."""

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("a 4-D input")
        return super().forward(x)


def test_leaf_modules_reach_every_analysis_of_the_lowering():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), _CheckedReLU(), nn.Conv2d(8, 8, 3), _CheckedReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    bundle = lower_to_dory(model, torch.rand(4, 3, 10, 10), "gap8", leaf_modules=[_CheckedReLU])
    assert [row["kind"] for row in bundle.report["layers"]][:2] == ["conv", "conv"]
    assert bundle.report["layers"][0]["bytes"] > 0 and bundle.report["layers"][0]["cycles"] is not None


# -- every unsupported op at once ---------------------------------------------------------------------------

class _Many(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, dilation=2, padding=2)
        self.hs = nn.Hardswish()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y = self.hs(self.a(x))
        z = torch.relu(self.b(y))  # the ReLU follows a refused conv: reported with it, not again
        g = z * torch.sigmoid(z)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(torch.cat([y, g], 1), 1), 1))


def test_a_refusal_lists_every_op_dory_cannot_run_with_its_line_and_fix():
    with pytest.raises(DuccioError) as info:
        lower_to_dory(_Many().eval(), torch.rand(2, 3, 8, 8), "gap8")
    err = info.value
    problems = err.problems
    whats = [p.what for p in problems]
    assert len(problems) == 5, whats
    for key, fix in [("Hardswish", "ReLU6"), ("dilation", "dilation 1"), ("sigmoid", "remove the sigmoid gate"),
                     ("mul", "remove the multiplication"), ("cat", "remove the concatenation")]:
        p = next(p for p in problems if key in p.what)
        assert fix in (p.fix or "") and p.node and f"node '{p.node}'" in (p.where or "")
        assert HERE in (p.where or ""), p.where  # the user's source line
        assert p.what in str(err) and (p.fix or "") in str(err)
    assert "5 ops" in err.what


def test_a_leaf_activation_subclass_with_its_own_forward_is_not_fused_as_a_clip():
    """A ReLU subclass kept as a leaf whose forward computes something else (here a leaky ReLU) would be fused as
    clip(0, inf) and silently change the function; a subclass that keeps ReLU's forward, or overrides it with
    the same values (`_CheckedReLU` above), still fuses."""

    class LeakyishReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.where(x > 0, x, 0.1 * x)

    class PlainReLU(nn.ReLU):
        pass

    class Net(nn.Module):
        def __init__(self, act: nn.Module) -> None:
            super().__init__()
            self.conv, self.act, self.fc = nn.Conv2d(3, 8, 3), act, nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.conv(x)).mean((2, 3)))

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(DuccioError, match="no kernel for module LeakyishReLU"):
        check_lowerable(Net(LeakyishReLU()).eval(), x, "gap8", leaf_modules=[LeakyishReLU])
    check_lowerable(Net(PlainReLU()).eval(), x, "gap8", leaf_modules=[PlainReLU])
