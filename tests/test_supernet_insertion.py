"""supernet-insertion: other uses of a replaced block's tensors stay valid, and the pass scales (one analysis
of all options, no convolution computed, whatever the number of choice points)."""

from __future__ import annotations

import sys
import types
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import duccio_fx
from duccio_fx.ir.meta import layer_terms, tensor_info
from duccio_fx.ir.pass_manager import PassContext
from duccio_fx.passes.supernet_insertion import SupernetInsertion
from duccio_fx.pipeline import analyze
from duccio_fx.search.alternatives import AlternativeSelection
from duccio_fx.search.choice_point import ChoicePoint
from duccio_fx.zoo import build as zoo_build
from tests.test_path_method import assert_costs_equal_export, randomize


class ReadsItsWeights(nn.Module):
    """Reads parameters of a conv block the path method replaces (conv and BatchNorm) outside that block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.last = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv.weight.dtype)
        x = torch.relu(self.bn(self.conv(torch.relu(self.stem(x)))))
        x = self.last(x) + self.conv.bias.view(1, -1, 1, 1) * self.bn.weight.view(1, -1, 1, 1)
        return self.fc(x.mean((2, 3)))


def _model_with_statistics() -> ReadsItsWeights:
    torch.manual_seed(0)
    model = ReadsItsWeights()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 2.0)
        model.conv.bias.normal_()
    return model.eval()


@pytest.mark.parametrize("choice", ["conv3", "conv5", "dwsep3", "identity"])
def test_other_uses_of_a_replaced_conv_read_the_seed_alternative_and_export_exactly(choice):
    model, x = _model_with_statistics(), torch.randn(2, 3, 8, 8)
    space = duccio_fx.make_searchable(model, x, method="path")
    assert "conv" in [i.point for i in space.infos]
    gm = space.graph_module
    seed = gm.get_submodule("conv").conv3
    # the seed alternative owns the seed's conv and BatchNorm; the other uses read those same tensors
    reads = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert reads == {"conv.conv3.conv.weight", "conv.conv3.conv.bias", "conv.conv3.bn.weight"}
    assert gm.get_parameter("conv.conv3.conv.bias") is seed.conv.bias
    assert not hasattr(gm, "bn")  # no stale copy of the BatchNorm left at its old name
    space.eval()
    assert torch.equal(space(x), model(x))  # untrained: the seed
    space.train()
    space(x).sum().backward()  # trains through both uses
    assert seed.conv.bias.grad is not None
    randomize(space, 3)
    space.set_choices({"conv": choice})
    space.eval()
    exported = space.export().eval()
    assert not any(isinstance(m, ChoicePoint) for m in exported.modules())
    with torch.no_grad():
        assert torch.equal(exported(x), space(x))
    assert_costs_equal_export(space, exported, x[:1])


def test_a_declared_choice_whose_parameter_the_model_reads_elsewhere_stays_valid():
    class Declared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = duccio_fx.Choice(wide=nn.Conv2d(8, 8, 5, padding=2), thin=nn.Conv2d(8, 8, 1))
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            y = self.block(torch.relu(self.stem(x))) * self.block.wide.bias.view(1, -1, 1, 1)
            return self.head(y.mean((2, 3)))

    model, x = Declared().eval(), torch.randn(2, 3, 8, 8)
    space = duccio_fx.make_searchable(model, x, method="path")
    assert [i.point for i in space.infos] == ["block"]
    for alt in ("wide", "thin"):
        space.set_choices({"block": alt})
        space.eval()
        exported = space.export().eval()
        with torch.no_grad():
            assert torch.equal(exported(x), space(x))
        assert_costs_equal_export(space, exported, x[:1])


def _torchvision():
    # torchvision's meta registrations need torch's private ops of the same build; the models do not
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision")


def test_a_torchvision_resnet_that_reads_a_conv_weight_exports_exactly():
    tv = _torchvision()

    class CastingResNet(tv.models.ResNet):
        """torchvision's ResNet-18, casting its input to its weights' dtype as mixed-precision code does."""

        def forward(self, x):
            return super().forward(x.to(self.layer1[0].conv1.weight.dtype))

    torch.manual_seed(0)
    model = CastingResNet(tv.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    space = duccio_fx.make_searchable(model, x, method="path", alternatives=["conv3,dwsep3,identity"])
    assert "layer1.0.conv1" in [i.point for i in space.infos]
    randomize(space, 0)
    space.set_choices({"layer1.0.conv1": "dwsep3"})
    space.eval()
    exported = space.export().eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), space(x), rtol=1e-5, atol=1e-6)
    assert_costs_equal_export(space, exported, x[:1])


# -- scaling ---------------------------------------------------------------------------------------------

class Chain(nn.Module):
    """A stem, then `blocks` conv-BN-ReLU blocks with a residual add every second one, then a head."""

    def __init__(self, blocks: int, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(blocks))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        x = self.stem(x)
        skip = x
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            x = torch.relu(bn(conv(x)))
            if i % 2 == 1:
                x = x + skip
                skip = x
        return self.head(x.mean((2, 3)))


class _CountConvs(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.conv2d, nn.functional.conv2d):
            self.convs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("blocks", [4, 40])
def test_insertion_analyses_all_options_at_once_and_computes_no_convolution(blocks):
    """The expensive steps run once per model, not once per choice point or option: one run of the analysis
    pipeline for every option together, and not one convolution computed (shapes only)."""
    x = torch.randn(1, 3, 8, 8)
    gm = analyze(Chain(blocks).eval(), x)
    calls = []

    def counting(module, inputs):
        calls.append(module)
        return analyze(module, inputs)

    step = SupernetInsertion(counting, AlternativeSelection.parse(None))
    with _CountConvs() as counted:
        PassContext().run(gm, [step])
    assert len(step.points) == blocks
    assert len(calls) == 1
    assert counted.convs == 0


def _per_option_terms(space: duccio_fx.PathSpace) -> list[list[tuple]]:
    """What the pass computed before it bundled the options: each option analysed on its own, on zeros."""
    from duccio_fx.costs.terms import is_head

    out = []
    nodes = {str(n.target): n for n in space.graph_module.graph.nodes if n.op == "call_module"}
    for info, point in zip(space.infos, space.points()):
        node = nodes[info.point]
        shape = (1,) + tuple(tensor_info(node.args[0]).shape[1:])
        head = is_head(node)
        options = []
        for name in point.names:
            alt = getattr(point, name)
            if not any(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) for m in alt.modules()):
                options.append(())
                continue
            terms = layer_terms(analyze(alt, torch.zeros(shape)))
            options.append(tuple(replace(t, name=f"{info.point}.{name}.{t.name}", requant=t.requant or not head)
                                 for t in terms))
        out.append(options)
    return out


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet_v1"])
def test_options_analysed_together_equal_each_option_analysed_alone(name):
    model, x = zoo_build(name)
    space = duccio_fx.make_searchable(model, x, method="path", alternatives=["conv1,conv3,conv5,dwsep3,dwsep5"])
    together = [[o.terms for o in info.options] for info in space.infos]
    assert together == _per_option_terms(space)
