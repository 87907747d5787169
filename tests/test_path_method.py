"""The path method: supernet insertion, Gumbel-softmax choice points, costs over choices, exact export."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx.cli import app
from duccio_fx.search.choice_point import ChoicePoint
from duccio_fx.search.constraints import Constraint
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.targets import load_target
from duccio_fx.zoo import build as zoo_build
from tests.test_optimize import MODEL_FILE, model_file, recipe
from tests.test_properties import build as build_plan
from tests.test_properties import plans

GAP8 = load_target("gap8")
TABLES = ("layer_params", "layer_macs", "layer_memory", "layer_size_bytes", "layer_bytes", "layer_cycles",
          "layer_latency_s")
TOTALS = ("params", "macs", "size_bytes", "cycles", "latency_s", "overflow_bytes")
runner = CliRunner()


def randomize(space: duccio_fx.PathSpace, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in space.points():
        with torch.no_grad():
            p.theta.copy_(torch.randn(len(p.names), generator=g))


def assert_costs_equal_export(space: duccio_fx.PathSpace, exported: nn.Module, x: torch.Tensor) -> None:
    """Totals equal exactly; every layer of the export has the search's value; the others read 0."""
    searched = space.cost_values(GAP8)
    measured = duccio_fx.measure_costs(exported, (x,), GAP8)
    for key in TOTALS:
        assert getattr(searched, key) == getattr(measured, key), key
    for key in TABLES:
        ours, theirs = getattr(searched, key), getattr(measured, key)
        assert {k: ours[k] for k in theirs} == theirs, key
        assert all(v == 0 for k, v in ours.items() if k not in theirs), key


# -- insertion on the zoo -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, points, fixed", [
    ("resnet8", 6, {"conv1": "first layer", "stack2.shortcut": "shortcut", "stack3.shortcut": "shortcut",
                    "fc": "linear layer"}),
    ("dscnn", 4, {"conv1": "first layer", "blocks.0.dw": "depthwise", "fc": "linear layer"}),
    ("mobilenet_v1", 13, {"features.0.0": "first layer", "features.1.dw.0": "depthwise", "fc": "linear layer"}),
])
def test_zoo_models_get_choice_points_and_fixed_layers_say_why(name, points, fixed):
    model, x = zoo_build(name)
    space = duccio_fx.make_searchable(model, x, method="path")
    assert len(space.infos) == points
    for layer, why in fixed.items():
        assert why in space.fixed[layer], (layer, space.fixed[layer])
    for info in space.infos:
        first = info.options[0]
        assert [o.name for o in info.options][1:] == [n for n in ("conv3", "conv5", "dwsep3", "identity")
                                                      if n in {o.name for o in info.options} and n != first.name]
    # untrained points compute the seed, and cost what the seed costs
    space.eval()
    assert torch.equal(space(x), model.eval()(x))
    seed = duccio_fx.measure_costs(model, (x,), GAP8)
    assert all(getattr(space.cost_values(GAP8), k) == getattr(seed, k) for k in TOTALS)


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet_v1"])
def test_argmax_export_is_exact_and_costs_match_it(name):
    model, x = zoo_build(name, batch=2)
    space = duccio_fx.make_searchable(model, x, method="path")
    randomize(space, 1)
    exported = space.export().eval()
    space.eval()
    assert not any(isinstance(m, ChoicePoint) for m in exported.modules())
    assert torch.allclose(exported(x), space(x), rtol=1e-5, atol=1e-6)
    assert_costs_equal_export(space, exported, x[:1])


def with_stem(plan, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A generated network behind a conv stem, so its blocks are not the first layer (which no method
    searches), and its example input."""
    net, x = build_plan(plan)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        stem = (nn.Conv1d if plan.dims == 1 else nn.Conv2d)(plan.channels, plan.channels, 3, padding=1)
    return nn.Sequential(stem, net).eval(), x


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(plan=plans(), seed=st.integers(0, 2**16))
def test_random_networks_export_exactly_with_exact_costs(plan, seed):
    model, x = with_stem(plan, seed)
    space = duccio_fx.make_searchable(model, x, method="path", cost_mode="sampled",
                                      alternatives=["conv1,conv3,conv5,dwsep3,dwsep5,identity"])
    randomize(space, seed)
    space.eval()
    exported = space.export().eval()
    with torch.no_grad():
        ref, out = space(x), exported(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-7)
    assert_costs_equal_export(space, exported, x[:1])
    # in training, the costs are those of the architecture the forward pass sampled (paper eq. 8)
    space.train()
    space(x)
    sampled = space.costs(GAP8)
    chosen = {i.point: p.names[int(p.sample.argmax())] for i, p in zip(space.infos, space.points())}
    space.set_choices(chosen)
    assert float(sampled.macs.detach()) == space.cost_values(GAP8).macs
    assert float(sampled.size_bytes.detach()) == pytest.approx(space.cost_values(GAP8).size_bytes, rel=1e-12)
    # with cost_mode="argmax", those of the architecture held, whatever the forward pass ran
    space.cost_mode = "argmax"
    space.resample()
    held = space.costs(GAP8)
    assert float(held.macs.detach()) == space.cost_values(GAP8).macs
    assert float(held.size_bytes.detach()) == pytest.approx(space.cost_values(GAP8).size_bytes, rel=1e-12)
    # with cost_mode="neighbours" (the default), the penalty's gradient reads every one-point flip's costs
    now = space.cost_values(GAP8)
    assert_neighbour_gradient(space, [Constraint.parse("size", "97%").resolve(now),
                                      Constraint.parse("macs", "102%").resolve(now)])


# -- the choice parametrization -------------------------------------------------------------------------

def test_costs_are_differentiable_and_prefer_cheaper_alternatives():
    model, x = zoo_build("resnet8", batch=4)
    space = duccio_fx.make_searchable(model, x, method="path")
    space.train()
    space(x)
    space.costs(GAP8).macs.backward()
    for p in space.points():
        grad = p.theta_grad
        assert grad is not None and grad.abs().sum() > 0
        conv5, dwsep3 = p.names.index("conv5"), p.names.index("dwsep3")
        assert grad[conv5] > grad[dwsep3]  # a descent step makes conv5 less likely than dwsep3


@pytest.mark.parametrize("estimator, runs", [("all", 4), ("sampled", 1)])
def test_estimators_run_every_or_only_the_sampled_alternative(estimator, runs):
    model, x = zoo_build("resnet8", batch=2)
    space = duccio_fx.make_searchable(model, x, method="path", estimator=estimator, argmax_share=0.0)
    point = space.points()[0]
    calls = []
    for name in point.names:
        getattr(point, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    space.train()
    loss = space(x).square().mean()
    loss.backward()
    assert len(calls) == runs
    assert point.theta_grad is not None and point.theta_grad.abs().sum() > 0


def test_expected_costs_use_the_probabilities():
    from duccio_fx.costs.program import plain_costs

    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path", cost_mode="expected")
    space.train()
    space(x)
    fixed = plain_costs([t for t in space.layout if isinstance(t, duccio_fx.ir.meta.LayerTerm)]).macs
    uniform = fixed + sum(sum(plain_costs(o.terms).macs for o in i.options) / len(i.options)
                          for i in space.infos)
    assert float(space.costs().macs.detach()) == pytest.approx(uniform, rel=1e-6)  # θ = 0: equal probabilities


def test_argmax_costs_are_the_held_architectures_with_the_probabilities_gradient():
    """cost_mode="argmax": in training the costs are those of the architecture the search holds (what export()
    returns), whatever the draw ran, and their gradient is softmax(θ)'s (also `costs()` with "neighbours")."""
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path", cost_mode="argmax")
    space.set_choices({"stack2.conv1": "dwsep3", "stack3.conv2": "identity"})
    space.train()
    space(x)
    costs = space.costs(GAP8)
    assert float(costs.size_bytes.detach()) == pytest.approx(float(space.cost_values(GAP8).size_bytes), rel=1e-9)
    costs.size_bytes.backward()
    expected = duccio_fx.make_searchable(model, x, method="path", cost_mode="expected")
    expected.load_state_dict(space.state_dict())
    expected.train()
    expected(x)
    expected.costs(GAP8).size_bytes.backward()
    assert torch.allclose(space.choice_bank.theta.grad, expected.choice_bank.theta.grad)


def assert_neighbour_gradient(space: duccio_fx.PathSpace, constraints: list) -> list[float]:
    """With cost_mode="neighbours", in training: the penalty's value is the held architecture's, and θ's
    gradient is that of Σ_k E_{i∼softmax(θ_k)} Σ_j R_j · [R_j > T_j] (λ = 1) over the architectures one point
    away from the one held (point k at alternative i), each computed from that architecture's own costs."""
    objective = DuccioObjective(constraints, schedule="constant", constant_lambda=1.0)
    space.cost_mode = "neighbours"
    space.train()
    space.resample()
    space.choice_bank.theta.grad = None
    penalty = space.penalty(objective, GAP8, 0.0)
    held = space.choices()
    value = float(objective.penalty(space.cost_values(GAP8), 0.0))
    assert float(penalty.detach()) == pytest.approx(value, rel=1e-12)
    penalty.backward()
    theta = space.choice_bank.theta.detach().clone()
    flips = []
    for info, point in zip(space.infos, space.points()):
        for name in point.names:
            space.set_choices({**held, info.point: name})
            costs = space.cost_values(GAP8)
            flips.append(sum(float(c.value(costs)) for c in constraints if not c.met(costs)))
    with torch.no_grad():
        space.choice_bank.theta.copy_(theta)
    reference = theta.clone().requires_grad_(True)
    probabilities = torch.cat([torch.softmax(t, 0) for t in reference.split(space.choice_bank.sizes)] or [reference])
    (probabilities.double() * torch.tensor(flips, dtype=torch.float64)).sum().backward()
    assert torch.allclose(space.choice_bank.theta.grad, reference.grad, rtol=1e-5, atol=1e-6 * max(flips + [1.0]))
    return flips


def test_neighbour_costs_read_the_costs_of_every_one_point_flip():
    """Two totals and a layer-wise bound, some met and some not by the flips (see assert_neighbour_gradient)."""
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path", cost_mode="neighbours")
    layer = "stack3.conv2.conv5.conv"  # a layer-wise bound that bites on every architecture holding conv5 there
    space.set_choices({"stack3.conv2": "conv5"})
    half = float(space.cost_values(GAP8).layer_bytes[layer]) / 2
    randomize(space, 3)
    now = space.cost_values(GAP8)  # bounds that a few flips meet: size just under the held one's, MACs over
    constraints = [Constraint.parse("size", "97%").resolve(now), Constraint.parse("macs", "102%").resolve(now),
                   Constraint("layer_memory", half, False, layer).at(half)]
    flips = assert_neighbour_gradient(space, constraints)
    assert len(set(flips)) > 2 and 0.0 in flips  # flips that meet every bound, and flips that do not


def test_neighbour_costs_push_nothing_where_every_flip_is_feasible():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path")
    assert space.cost_mode == "neighbours"  # the path method's default
    bound = Constraint.parse("size", "200%").resolve(space.cost_values(GAP8))
    space.train()
    space.resample()
    space.penalty(DuccioObjective([bound], schedule="constant"), GAP8, 0.0).backward()
    assert not space.choice_bank.theta.grad.any()


def test_path_mask_refuses_neighbour_costs():
    model, x = zoo_build("resnet8")
    with pytest.raises(duccio_fx.DuccioError, match="neighbours"):
        duccio_fx.make_searchable(model, x, method="path+mask", cost_mode="neighbours")


def test_temperature_decays_per_epoch():
    model, x = zoo_build("dscnn")
    space = duccio_fx.make_searchable(model, x, method="path", temperature=4.0, temperature_decay=0.5)
    space.on_epoch(3)
    assert all(p.temperature == 0.5 for p in space.points())


def test_warmup_trains_whole_paths_then_the_seed_path_only():
    """θ frozen: each draw runs the seed's whole path with probability warmup_seed_share, otherwise every
    point draws uniformly; the last third of the warmup epochs runs the seed's path only."""
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path", warmup_seed_share=0.5)
    bank = space.choice_bank
    bank.theta.requires_grad_(False)
    shares = []
    for epoch in range(6):
        space.on_warmup_epoch(epoch, 6)
        shares.append(bank.seed_share)
    assert shares == [0.5, 0.5, 0.5, 0.5, 1.0, 1.0]
    space.on_warmup_epoch(0, 6)
    torch.manual_seed(0)
    picks = [tuple(bank.draw() is not None and bank.picks) for _ in range(400)]
    seed_path = sum(p == (0,) * len(bank.sizes) for p in picks) / len(picks)
    assert 0.42 < seed_path < 0.58  # (uniform draws all-seed with probability ~1/4^6: negligible)
    others = [k for p in picks if p != (0,) * len(bank.sizes) for k in p]
    assert {0, 1, 2}.issubset(others)
    space.on_warmup_epoch(5, 6)
    assert all(set(bank.draw() is not None and bank.picks) == {0} for _ in range(20))
    bank.theta.requires_grad_(True)  # the search: θ draws again, whatever the warmup share
    torch.manual_seed(1)
    assert any(set(bank.draw() is not None and bank.picks) != {0} for _ in range(20))
    with pytest.raises(duccio_fx.DuccioError, match="warmup_seed_share"):
        duccio_fx.make_searchable(model, x, method="path", warmup_seed_share=1.5)


@pytest.mark.parametrize("method, options, logit", [("path", {}, 2.0), ("path+mask", {}, 2.0),
                                                     ("path", {"seed_logit": 0.0}, 0.0)])
def test_search_starts_with_each_seed_alternative_at_the_seed_logit(tmp_path, method, options, logit):
    """θ of every point's seed alternative starts the search at `seed_logit` (each method's default, or the
    option), the others at 0: also after a warmup read from the cache, which holds θ as the warmup left it."""
    for cached in (False, True):
        r = recipe(tmp_path, cache=tmp_path / "cache", method=method, method_options=options, search_epochs=0,
                   max_search_epochs=0, finetune_epochs=0)
        result = r.run()
        assert result.warmup_cached is cached
        bank = r.space.choice_bank
        expected = torch.zeros_like(bank.theta).index_fill_(0, bank.start, logit)
        assert torch.equal(bank.theta.detach(), expected)
    model, x = zoo_build("resnet8")
    with pytest.raises(duccio_fx.DuccioError, match="seed logit"):
        duccio_fx.make_searchable(model, x, method=method, seed_logit=-1.0)


def test_search_trains_the_argmax_path_in_its_argmax_share_of_the_draws():
    """While θ trains, a draw runs every point's argmax alternative with probability `argmax_share`: a constant
    one-hot (no gradient to θ), and the 'all' estimator runs that alternative alone; the warmup is unchanged."""
    model, x = zoo_build("resnet8", batch=2)
    space = duccio_fx.make_searchable(model, x, method="path", argmax_share=0.5)
    bank = space.choice_bank
    held = {p: "dwsep3" for p in space.choices()}
    space.set_choices(held)
    argmax = tuple(p.names.index("dwsep3") for p in space.points())
    torch.manual_seed(0)
    draws = [bank.draw() for _ in range(400)]
    constant = [d for d in draws if not d.requires_grad]
    assert 0.42 < len(constant) / len(draws) < 0.58
    assert all(torch.equal(d, bank.argmax()) for d in constant)
    picks = []
    for _ in range(50):
        bank.draw()
        picks.append(tuple(bank.picks) == argmax and not bank.sample.requires_grad)
    assert any(picks) and not all(picks)
    point = space.points()[0]
    calls = []
    for name in point.names:
        getattr(point, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    space.train()
    torch.manual_seed(3)
    for _ in range(20):
        calls.clear()
        space.resample()
        space(x)
        assert len(calls) == (1 if not bank.sample.requires_grad else len(point.names))
    bank.theta.requires_grad_(False)  # the warmup: its own rule (here the seed's path only), no argmax draws
    space.on_warmup_epoch(2, 3)
    assert all(set(bank.draw() is not None and bank.picks) == {0} for _ in range(100))
    for bad in (-0.1, 1.0):
        with pytest.raises(duccio_fx.DuccioError, match="argmax share"):
            duccio_fx.make_searchable(model, x, method="path", argmax_share=bad)


def test_frozen_theta_runs_only_the_sampled_alternative():
    """In the warmup θ does not train, so the 'all' estimator's other alternatives would add nothing."""
    model, x = zoo_build("resnet8", batch=2)
    space = duccio_fx.make_searchable(model, x, method="path", estimator="all")
    point = space.points()[0]
    calls = []
    for name in point.names:
        getattr(point, name).register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    space.choice_bank.theta.requires_grad_(False)
    space.train()
    space(x)
    assert len(calls) == 1


def test_warmup_validation_recalibrates_the_seed_path(tmp_path):
    """The warmup's paths share BatchNorms: their statistics are re-estimated for the seed's path before the
    warmup's validation, as before a search validation (the mask method's warmup trains the seed alone)."""
    import duccio_fx.search.recipe as r

    calls = []
    real = r.recalibrate_batchnorm
    r.recalibrate_batchnorm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        recipe(tmp_path, method="path", warmup_epochs=1, search_epochs=0, max_search_epochs=0,
               finetune_epochs=0)._warmup()
        assert len(calls) == 1
        recipe(tmp_path, warmup_epochs=1, search_epochs=0, max_search_epochs=0, finetune_epochs=0)._warmup()
        assert len(calls) == 1
    finally:
        r.recalibrate_batchnorm = real


def test_default_set_leaves_out_alternatives_far_costlier_than_the_seed_block():
    """DS-CNN's 1x1 blocks: conv3 and conv5 cost 9x and 25x the seed's MACs, so the default set leaves them
    out (and says why); named in --alternatives they are offered."""
    model, x = zoo_build("dscnn")
    space = duccio_fx.make_searchable(model, x, method="path")
    for info, point in zip(space.infos, space.points()):
        assert point.names == ["conv1", "dwsep3", "identity"]
        assert set(space.dropped[info.point]) == {"conv3", "conv5"}
        assert "9.0x the seed block's MACs" in space.dropped[info.point]["conv3"]
    named = duccio_fx.make_searchable(model, x, method="path", alternatives="conv3,conv5,dwsep3,identity")
    assert all(p.names == ["conv1", "conv3", "conv5", "dwsep3", "identity"] for p in named.points())
    assert named.dropped == {}
    resnet = duccio_fx.make_searchable(*zoo_build("resnet8"), method="path")  # conv5: 2.8x a conv3 block
    assert resnet.dropped == {} and all("conv5" in p.names for p in resnet.points())
    result = runner.invoke(app, ["inspect", "zoo:dscnn", "--method", "path", "--json"])
    assert result.exit_code == 0, result.output
    points = json.loads(result.output)["path"]["points"]
    assert set(points[0]["not_offered"]) == {"conv3", "conv5"}
    text = runner.invoke(app, ["inspect", "zoo:dscnn", "--method", "path"], env={"COLUMNS": "200"}).output
    assert "alternatives of the default set not offered" in text and "25.0x the seed block's MACs" in text


def test_minimum_costs_take_each_point_at_its_cheapest_alternative():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path")
    low = space.minimum_costs(GAP8)
    space.set_choices({i.point: ("identity" if "identity" in [o.name for o in i.options] else "dwsep3")
                       for i in space.infos})
    smallest = space.cost_values(GAP8)
    assert (low.params, low.macs, low.size_bytes) == (smallest.params, smallest.macs, smallest.size_bytes)


# -- the model's own choices ------------------------------------------------------------------------------

class Declared(nn.Module):
    def __init__(self, bad: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = duccio_fx.Choice(
            wide=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
            thin=nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()),
            skip=nn.Identity() if not bad else nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_declared_choice_is_a_search_point_and_exports_exactly():
    model, x = Declared().eval(), torch.randn(2, 3, 8, 8)
    space = duccio_fx.make_searchable(model, x, method="path")
    assert [(i.point, [o.name for o in i.options], i.declared) for i in space.infos] == [
        ("block", ["wide", "thin", "skip"], True)]
    assert "only those are searched" in space.fixed["stem"]
    for alt in ("wide", "thin", "skip"):
        space.set_choices({"block": alt})
        space.eval()
        exported = space.export().eval()
        assert torch.equal(exported(x), space(x))
        assert_costs_equal_export(space, exported, x[:1])


def test_a_choice_that_is_never_called_is_refused():
    class Skips(Declared):
        def forward(self, x):
            return self.head(torch.relu(self.stem(x)).mean((2, 3)))  # never calls self.block

    model = Skips()
    with pytest.raises(duccio_fx.DuccioError, match="does not appear in the traced graph"):
        duccio_fx.make_searchable(model, torch.randn(1, 3, 8, 8), method="path")


def test_choice_alternatives_that_disagree_in_shape_are_refused():
    with pytest.raises(duccio_fx.DuccioError, match="alternative 'skip' of 'block' gives shape"):
        duccio_fx.make_searchable(Declared(bad=True), torch.randn(1, 3, 8, 8), method="path")


# -- selections and bad input ---------------------------------------------------------------------------

def test_alternatives_per_layer_pattern_and_none():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path",
                                      alternatives=["conv3,identity", "stack3.*=conv3,dwsep3", "stack1.conv1=none"])
    names = {i.point: [o.name for o in i.options] for i in space.infos}
    assert names["stack1.conv2"] == ["conv3", "identity"]
    assert names["stack3.conv1"] == ["conv3", "dwsep3"]
    assert "stack1.conv1" not in names and "kept by" in space.fixed["stack1.conv1"]


@pytest.mark.parametrize("alternatives, message", [
    (["conv3,conv9"], "unknown alternative 'conv9'"),
    (["nolayer.*=conv3"], "matches no layer"),
    (["=conv3"], "empty layer pattern"),
])
def test_bad_alternatives_are_refused(alternatives, message):
    model, x = zoo_build("resnet8")
    with pytest.raises(duccio_fx.DuccioError, match=message):
        duccio_fx.make_searchable(model, x, method="path", alternatives=alternatives)


def test_a_registered_alternative_is_used():
    @duccio_fx.register_alternative("conv3x1")
    def conv3x1(block: duccio_fx.BlockSpec) -> nn.Module:
        if block.dims != 2:
            raise duccio_fx.NotApplicable("2-D only")
        pad = block.padding_for(3)
        return nn.Sequential(nn.Conv2d(block.in_channels, block.out_channels, (3, 1), stride=block.stride,
                                       padding=(pad[0], 0)), nn.ReLU())
    from duccio_fx.search.alternatives import BUILDERS

    model, x = zoo_build("resnet8")
    try:
        space = duccio_fx.make_searchable(model, x, method="path", alternatives=["conv3x1"])
    finally:
        BUILDERS.pop("conv3x1")  # other tests list the built-in names
    assert all([o.name for o in i.options] == ["conv3", "conv3x1"] for i in space.infos)
    space.set_choices({i.point: "conv3x1" for i in space.infos})
    space.eval()
    exported = space.export().eval()
    assert torch.equal(exported(x), space(x))
    assert_costs_equal_export(space, exported, x)


@pytest.mark.parametrize("args, message", [
    (["--alternatives", "conv3,conv9"], "unknown alternative"),
    (["--alternatives", "zz*=conv3"], "matches no layer"),
    (["--estimator", "some"], "unknown estimator"),
    (["--path-costs", "mean"], "unknown cost mode"),
    (["--argmax-share", "1"], "argmax share 1.0 must lie in [0, 1)"),
    (["--method", "path+mask", "--path-costs", "neighbours"], "has no 'neighbours' costs"),
    (["--method", "path+mask", "--path-costs", "mean"], "use one of: sampled, expected, argmax"),
])
def test_optimize_path_bad_input_exits_1_before_training(tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--method", "path", "--max-size", "50%",
                                 "--out", str(out), "--no-cache", *args])  # (a later --method wins)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


@pytest.mark.parametrize("option", [["--estimator", "sampled"], ["--seed-logit", "2"], ["--argmax-share", "0.5"]])
def test_path_options_need_the_path_method(tmp_path, option):
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", *option])
    assert result.exit_code == 1 and "belongs to the path method" in result.output


def test_inspect_method_path_lists_points_and_fixed_layers():
    result = runner.invoke(app, ["inspect", "zoo:resnet8", "--method", "path", "--target", "gap8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)["path"]
    assert [p["point"] for p in report["points"]][:2] == ["stack1.conv1", "stack1.conv2"]
    first = report["points"][0]["alternatives"]
    assert [a["name"] for a in first] == ["conv3", "conv5", "dwsep3", "identity"]
    assert first[1]["macs"] > first[0]["macs"] > first[2]["macs"] > first[3]["macs"] == 0
    assert "first layer" in report["fixed"]["conv1"]


# -- the recipe ---------------------------------------------------------------------------------------------

PATH_FILE = MODEL_FILE.replace(
    "self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU())",
    "self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(), "
    "nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())")


def run_whole_and_resumed(tmp_path, settings: dict) -> tuple:
    """The recipe on PATH_FILE run whole, and run again interrupted after search epoch 1 then resumed."""
    (tmp_path / "m").mkdir()

    def run(checkpoint, progress=None, resume=False):
        import tests.test_optimize as t
        saved, t.MODEL_FILE = t.MODEL_FILE, PATH_FILE
        try:
            return recipe(tmp_path / "m", checkpoint=checkpoint, progress=progress, **settings).run(resume)
        finally:
            t.MODEL_FILE = saved

    class Stop(Exception):
        pass

    def interrupt(event, data):
        if event == "epoch" and data["record"].phase == "search" and data["record"].epoch == 0:
            raise Stop

    whole = run(tmp_path / "a.pt")
    with pytest.raises(Stop):
        run(tmp_path / "b.pt", interrupt)
    return whole, run(tmp_path / "b.pt", resume=True)


def test_recipe_path_meets_the_bound_and_resumes_exactly(tmp_path):
    # the warmup trains the seed's path only (one epoch), so the search needs more than 2 epochs to leave it
    whole, resumed = run_whole_and_resumed(tmp_path, {"method": "path", "warmup_epochs": 1, "search_epochs": 3,
                                                      "finetune_epochs": 1})
    assert whole.met
    measured = duccio_fx.measure_costs(whole.model, (torch.randn(1, 1, 8, 8),), GAP8)
    assert whole.final_costs == measured
    assert any(r.architecture for r in whole.history if r.phase == "search")
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in whole.history]
    assert [r.architecture for r in resumed.history] == [r.architecture for r in whole.history]
    assert resumed.final_costs == whole.final_costs


def test_path_layerwise_constraints_pick_critical_alternative_layers():
    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path")
    names = {t.name for t in space.layer_candidates()}
    assert "stack3.conv2.conv5.conv" in names and "stack3.conv2.conv3.conv" in names
    c = duccio_fx.Constraint.parse("layer_memory", "100kB", scope="stack3.conv2.conv5.conv").resolve(
        space.cost_values(GAP8))
    assert c.value(space.cost_values(GAP8)) == 0  # not chosen: takes no memory
    space.set_choices({"stack3.conv2": "conv5"})
    assert c.value(space.cost_values(GAP8)) > 100_000


def test_infeasible_path_bound_names_the_fixed_layers():
    from duccio_fx.search.feasibility import check_feasible

    model, x = zoo_build("resnet8")
    space = duccio_fx.make_searchable(model, x, method="path")
    with pytest.raises(duccio_fx.DuccioError, match="'conv1'"):
        check_feasible(space, [duccio_fx.Constraint.parse("macs", "1k").resolve(space.cost_values())])


def test_dory_lowers_a_path_result():
    model, x = zoo_build("resnet8", batch=8)
    space = duccio_fx.make_searchable(model, x, method="path")
    space.set_choices({"stack1.conv1": "dwsep3", "stack1.conv2": "identity", "stack2.conv2": "conv5"})
    exported = space.export().eval()
    bundle = duccio_fx.lower_to_dory(exported, [(x, torch.zeros(8, dtype=torch.long))], "gap8", calib_batches=1)
    assert len(bundle.net.layers) > 5


def test_all_estimator_gradients_equal_running_every_alternative_in_the_graph():
    torch.manual_seed(0)
    alts = {"a": nn.Conv2d(3, 3, 3, padding=1), "b": nn.Conv2d(3, 3, 1), "c": nn.Identity()}
    point = ChoicePoint(alts, "all").train()
    x = torch.randn(2, 3, 5, 5)
    torch.manual_seed(1)
    point(x).square().sum().backward()
    ours = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in point.parameters()]  # None: unused
    point.zero_grad()
    torch.manual_seed(1)
    g = point.draw()
    sum(alt(x) * g[i] for i, alt in enumerate(point.children())).square().sum().backward()
    for a, b in zip(ours, [p.grad for p in point.parameters()]):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


class _Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _SwishNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = _Swish()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.act(self.bn(self.conv(self.stem(x)))).mean((2, 3)))


def test_a_block_activation_is_whatever_the_registry_says_is_one():
    """The supernet pass asks the op registry's "activation" hooks: a user's activation joins the block (and
    is copied into every alternative) once it has one."""
    from duccio_fx.ir.activation_hooks import copy_module
    from duccio_fx.ir.registry import REGISTRY

    x = torch.randn(1, 3, 8, 8)

    def swishes() -> int:
        space = duccio_fx.make_searchable(_SwishNet(), x, method="path")
        return sum(isinstance(m, _Swish) for m in space.modules())

    duccio_fx.register_module(_Swish, "follows")  # acts on each channel, but no activation hook yet
    try:
        assert swishes() == 1  # it stays outside the choice point
        duccio_fx.add_hook(_Swish, "activation", copy_module)
        assert swishes() > 2  # the seed block's, and a copy in every other alternative
    finally:
        REGISTRY.modules.pop(_Swish)
        REGISTRY.leaf_modules.discard(_Swish)
