"""The path+mask method: choice points whose alternatives share the mask method's channel masks."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx.cli import app
from duccio_fx.search.choice_point import ChoicePoint
from duccio_fx.zoo import build as zoo_build
from tests.test_path_method import (GAP8, PATH_FILE, assert_costs_equal_export, randomize, run_whole_and_resumed,
                                    with_stem)
from tests.test_properties import plans

runner = CliRunner()


def random_masks(space: duccio_fx.PathMaskSpace, seed: int, keep: float = 0.6) -> None:
    g = torch.Generator().manual_seed(seed)
    if space.bank is not None:
        with torch.no_grad():
            space.bank.alpha.copy_((torch.rand(space.bank.alpha.shape, generator=g) < keep).to(space.bank.alpha))


def test_path_mask_is_a_registered_method():
    assert "path+mask" in duccio_fx.search_methods()
    result = runner.invoke(app, ["methods"])
    assert "path+mask" in result.output


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet_v1"])
def test_zoo_seed_is_unchanged_and_random_choices_and_masks_export_exactly(name):
    model, x = zoo_build(name, batch=2)
    space = duccio_fx.make_searchable(model, x, method="path+mask")
    assert isinstance(space, duccio_fx.PathMaskSpace) and space.channel_groups
    space.eval()
    assert torch.allclose(space(x), model.eval()(x), rtol=1e-5, atol=1e-6)  # θ = 0 and every channel: the seed
    seed = duccio_fx.measure_costs(model, (x[:1],), GAP8)
    assert space.cost_values(GAP8).size_bytes == seed.size_bytes
    for k in range(3):
        randomize(space, k)
        random_masks(space, k)
        exported = space.export().eval()
        assert not any(isinstance(m, ChoicePoint) for m in exported.modules())
        with torch.no_grad():
            assert torch.allclose(exported(x), space(x), rtol=1e-5, atol=1e-6)
        assert_costs_equal_export(space, exported, x[:1])
        assert duccio_fx.measure_costs(exported, (x[:1],), GAP8).size_bytes < seed.size_bytes


def test_identity_is_offered_only_where_input_and_output_are_one_group():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path+mask")
    for point in space.points():
        assert "identity" not in point.names
    assert "one channel group" in space.dropped["stack1.conv1"]["identity"]

    class Residual(nn.Module):  # y + choice(y): the Choice reads and writes one group (the add ties them)
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = duccio_fx.Choice(conv=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                             nn.ReLU()), skip=nn.Identity())
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.stem(x)
            return self.head(torch.relu(y + self.block(y)))

    x = torch.randn(2, 3, 6, 6)
    space = duccio_fx.make_searchable(Residual(), x, method="path+mask")
    (point,) = space.points()
    assert point.names == ["conv", "skip"] and space.channel_groups
    space.set_choices({"block": "skip"})
    random_masks(space, 0, keep=0.5)
    space.eval()
    exported = space.export().eval()
    assert torch.allclose(exported(x), space(x), rtol=1e-5, atol=1e-6)
    assert_costs_equal_export(space, exported, x[:1])


def test_costs_follow_the_sampled_alternative_and_the_masks():
    model, x = zoo_build("resnet8", batch=4)
    space = duccio_fx.make_searchable(model, x, method="path+mask", cost_mode="sampled")
    random_masks(space, 3)
    space.train()
    space(x)
    sampled = space.costs(GAP8)
    chosen = {i.point: p.names[int(p.sample.argmax())] for i, p in zip(space.infos, space.points())}
    sampled["size_bytes"].backward()
    assert space.choice_bank.theta.grad.abs().sum() > 0 and space.bank.alpha.grad.abs().sum() > 0
    space.set_choices(chosen)
    assert float(sampled.size_bytes.detach()) == pytest.approx(space.cost_values(GAP8).size_bytes, rel=1e-12)
    assert float(sampled.cycles.detach()) == pytest.approx(space.cost_values(GAP8).cycles, rel=1e-12)


def test_default_costs_are_expected_over_the_probabilities():
    """path+mask's default: Σ_i softmax(θ)_i · cost_i(masks), so the masks, shared by every alternative, are
    not pushed down by the steps that draw a costly one; θ's gradient flows through the probabilities."""
    model, x = zoo_build("resnet8", batch=4)
    space = duccio_fx.make_searchable(model, x, method="path+mask")
    random_masks(space, 4)
    names = space.points()[0].names
    assert all(p.names == names for p in space.points())  # θ = 0: every point uniform over the same names
    space.train()
    space(x)
    expected = space.costs(GAP8)
    expected["size_bytes"].backward()
    assert space.choice_bank.theta.grad.abs().sum() > 0 and space.bank.alpha.grad.abs().sum() > 0
    each = [(space.set_choices({i.point: alt for i in space.infos}) or space.cost_values(GAP8)) for alt in names]
    for field in ("size_bytes", "macs"):
        mean = sum(getattr(c, field) for c in each) / len(names)
        assert float(getattr(expected, field).detach()) == pytest.approx(mean, rel=1e-6)  # (float32 softmax)


def test_minimum_costs_are_one_channel_per_group_and_the_cheapest_alternatives():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path+mask")
    least = space.minimum_costs(GAP8)
    one = {g.id: torch.nn.functional.one_hot(torch.tensor(0), g.channels).bool() for g in space.channel_groups}
    space.set_masks(one)
    best = min((space.set_choices({i.point: alt for i in space.infos}) or space.cost_values(GAP8)).size_bytes
               for alt in ("conv3", "dwsep3"))
    assert least.size_bytes <= best
    assert least.size_bytes < duccio_fx.make_searchable(model, x, method="path").minimum_costs(GAP8).size_bytes


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(plan=plans(), seed=st.integers(0, 2**16))
def test_random_networks_export_exactly_with_exact_costs(plan, seed):
    model, x = with_stem(plan, seed)
    space = duccio_fx.make_searchable(model, x, method="path+mask",
                                      alternatives=["conv1,conv3,conv5,dwsep3,dwsep5,identity"])
    randomize(space, seed)
    random_masks(space, seed)
    event(f"{min(len(space.infos), 3)}+ choice points, {min(len(space.channel_groups), 3)}+ searched groups")
    space.eval()
    exported = space.export().eval()
    # (a depthwise conv cut to one channel is an ordinary conv in the exported model, with that kernel's
    # cycles: a known difference of the layer kinds, which test_mixed_precision.py excludes too)
    depthwise = {t.name for t in space.program().terms if t.kind == "depthwise"}
    assume(not any(isinstance(m, nn.modules.conv._ConvNd) and m.in_channels == 1 and n in depthwise
                   for n, m in exported.named_modules()))
    with torch.no_grad():
        ref, out = space(x), exported(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-7)
    assert_costs_equal_export(space, exported, x[:1])


def test_recipe_meets_the_bound_resumes_exactly_and_the_report_says_what_it_kept(tmp_path):
    whole, resumed = run_whole_and_resumed(tmp_path, {"method": "path+mask", "warmup_epochs": 1,
                                                      "search_epochs": 3, "finetune_epochs": 1})
    assert whole.met
    assert whole.final_costs == duccio_fx.measure_costs(whole.model, (torch.randn(1, 1, 8, 8),), GAP8)
    arch = next(r.architecture for r in reversed(whole.history) if r.phase == "search")
    assert all({"choice", "probabilities", "channels"} <= set(a) for a in arch.values())
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in whole.history]
    assert resumed.final_costs == whole.final_costs


def test_layerwise_constraints_read_the_alternatives_layers_at_their_masks():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path+mask")
    names = {t.name for t in space.layer_candidates()}
    assert "stack3.conv2.conv5.conv" in names
    c = duccio_fx.Constraint.parse("layer_memory", "100kB", scope="stack3.conv2.conv5.conv").resolve(
        space.cost_values(GAP8))
    assert c.value(space.cost_values(GAP8)) == 0  # not chosen
    space.set_choices({"stack3.conv2": "conv5"})
    whole = c.value(space.cost_values(GAP8))
    group = next(g for g in space.channel_groups if g.channels == 64)
    space.set_masks({group.id: torch.arange(64) < 16})
    assert 0 < c.value(space.cost_values(GAP8)) < whole


def test_optimize_cli_path_mask_with_latency_onnx_and_dory(tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "pm.py"
    path.write_text(PATH_FILE)  # (the toy model and data of the path method's recipe test)
    result = runner.invoke(app, ["optimize", str(path), "--method", "path+mask", "--target", "gap8",
                                 "--max-size", "60%", "--max-latency", "90%", "--epochs", "1,3,1", "--out", str(out),
                                 "--no-cache", "--dory"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "path+mask" and report["status"] == "met"
    assert all("channels" in a for a in report["architecture"].values())
    assert report["onnx_max_abs_diff"] is not None and report["onnx_max_abs_diff"] < 1e-4
    assert (out / "dory").is_dir()
    assert "channels kept" in result.output


def test_inspect_path_mask_lists_points_and_what_it_does_not_offer():
    result = runner.invoke(app, ["inspect", "zoo:resnet8", "--method", "path+mask", "--json"])
    assert result.exit_code == 0, result.output
    points = json.loads(result.output)["path"]["points"]
    assert [a["name"] for a in points[0]["alternatives"]] == ["conv3", "conv5", "dwsep3"]
    assert "identity" in points[0]["not_offered"]


def test_a_choice_the_masks_cannot_follow_keeps_its_channels_whole():
    class Pair(nn.Module):  # not a sequence of layers: the mask of its input cannot reach its conv
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.conv(x))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.block = duccio_fx.Choice(seq=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()), pair=Pair())
            self.mid = nn.Conv2d(8, 6, 1)
            self.head = nn.Conv2d(6, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.block(self.stem(x)))))

    x = torch.randn(2, 3, 6, 6)
    space = duccio_fx.make_searchable(Net(), x, method="path+mask")
    assert any("'pair' of 'block'" in why for why in space.frozen_groups.values())
    searched = {g.id for g in space.channel_groups}
    assert searched and not searched & set(space.frozen_groups)  # mid's output is still searched
    for choice in ("seq", "pair"):
        space.set_choices({"block": choice})
        random_masks(space, 1, keep=0.5)
        space.eval()
        exported = space.export().eval()
        assert torch.allclose(exported(x), space(x), rtol=1e-5, atol=1e-6)
        assert_costs_equal_export(space, exported, x[:1])
