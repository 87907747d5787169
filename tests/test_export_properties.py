"""Property tests for the shrinking export: random CNNs (the generator of `tests/test_properties.py`) are made
searchable, every searchable group gets a random mask, and the exported plain model must keep the promises of
`SearchableModel.export`:

 1. in eval mode it computes the same outputs as the searchable model with the same masks (float32, 1e-5
    relative to the output scale) — with non-zero BN biases / running means and conv biases everywhere, so a
    removed channel is *not* zero downstream and only exact slicing of every per-channel tensor passes;
 2. `costs()["params"]` and `costs()["macs"]` equal, as integers, the figures counted independently on the
    exported model (conv / linear weight + bias elements; MACs per sample = weight elements × output
    positions, or input positions for a transposed conv), counted twice at batch 1: from the aten ops the model
    runs (`tests/counting.py`, which also sees `F.linear` / `F.conv2d` / matmuls with a parameter), and with
    forward hooks on its conv / linear modules (the generated models call every layer as a module, so the two
    counts must agree);
 3. every exported conv / linear is exactly as wide as the masks say (output: original width minus the removed
    channels of every group member it produces; input: the kept entries of the layout it reads), and the
    exported model holds only ordinary torch modules: no mask bank, no masked twin, no mask node;
 4. it survives `torch.save` / `torch.load` (weights_only=False) with the same outputs.

Masks are drawn per group: all kept, none kept (the library keeps the largest-α channel, i.e. channel 0 of a
freshly set mask), or random; `masks()` must report what was set (with that one exception).
"""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule

import duccio_fx
from duccio_fx.cli.inspect_view import inspect_report
from duccio_fx.search.masks import MaskBank
from duccio_fx.ir.meta import ChannelLayout, channel_layout
from tests import counting
from tests.test_properties import EVERY_BLOCK, Plan, build, plans

MAX_EXAMPLES = 300
RTOL = 1e-5


# --------------------------------------------------------------------------------------------------
# making removed channels matter
# --------------------------------------------------------------------------------------------------
def randomize(model: nn.Module, seed: int, add_biases: bool) -> None:
    """Random BN statistics and affine parameters (non-zero bias and running mean, some negative scales), and
    optionally a random bias on every conv that has none (depthwise, grouped), so that a removed channel
    carries a non-zero value through BN, depthwise convs, adds and pools until a masked consumer drops it."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * (hi - lo) + lo

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(rand(n))
                m.running_var.copy_(rand(n, lo=0.5, hi=2.0))
                sign = torch.where(torch.rand(n, generator=gen) < 0.2, -1.0, 1.0)
                m.weight.copy_(sign * rand(n, lo=0.5, hi=1.5))
                m.bias.copy_(rand(n))
            elif isinstance(m, nn.modules.conv._ConvNd):
                if m.bias is None and add_biases:
                    m.bias = nn.Parameter(rand(m.out_channels))
                elif m.bias is not None and bool((m.bias == 0).all()):
                    m.bias.copy_(rand(m.out_channels))
    model.eval()


# --------------------------------------------------------------------------------------------------
# independent figures of the exported model
# --------------------------------------------------------------------------------------------------
def counted_costs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(params, MACs per sample) of every conv / linear layer `model` runs, module or functional, counted from
    the aten ops of one batch-1 forward pass (`tests/counting.py`: no torch.fx, no duccio-fx)."""
    return counting.counted_costs(model, x)


def hooked_costs(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(params, MACs per sample) of the conv / linear *modules* of `model`, counted with forward hooks (blind to
    functional layers: a second, independent count for models that call every layer as a module)."""
    params, macs = 0, 0
    hooks = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        nonlocal macs
        assert output.shape[0] == 1
        if isinstance(module, nn.Linear):
            macs += module.weight.numel() * math.prod(output.shape[1:-1])
        elif module.transposed:
            macs += module.weight.numel() * math.prod(inputs[0].shape[2:])
        else:
            macs += module.weight.numel() * math.prod(output.shape[2:])

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            params += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return params, macs


def exact_int(value: Any, what: str) -> int:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    assert v == int(v), f"{what} is not an integer: {v}"
    return int(v)


def kept_width(layout: ChannelLayout, masks: dict[int, torch.Tensor]) -> int:
    """Entries of a tensor's channel dim that survive (masks by group id; other groups stay whole)."""
    return sum((s.stop - s.start) * s.block if s.group not in masks else int(masks[s.group][s.start:s.stop].sum())
               * s.block for s in layout.slices)


def _width(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def assert_plain(gm: GraphModule) -> None:
    """Every submodule is an ordinary torch.nn module (containers included), nothing of duccio-fx."""
    for name, m in gm.named_modules():
        if m is gm:
            continue
        assert not isinstance(m, MaskBank), f"{name} is a MaskBank"
        assert type(m).__module__.startswith("torch.nn.modules") or type(m) is nn.Module, \
            f"exported module {name!r} is a {type(m).__module__}.{type(m).__qualname__}"


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = float(want.abs().max()) or 1.0
    err = float((got - want).abs().max())
    assert err <= RTOL * scale, f"{what}: max abs difference {err:.3g} > {RTOL} × output scale {scale:.3g}"


# --------------------------------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------------------------------
def check_export(model: nn.Module, x: torch.Tensor, draw_mask: Any) -> dict[str, int]:
    sm = duccio_fx.make_searchable(model, x)
    sm.eval()

    # every conv / linear counts, frozen or searchable: costs() == inspect == the seed's own modules
    seed_costs = sm.costs()
    totals = inspect_report(duccio_fx.analyze(model, x), "generated")["totals"]
    assert (exact_int(seed_costs["params"], "params"), exact_int(seed_costs["macs"], "MACs")) \
        == (totals["params"], totals["macs"]) == counted_costs(model, x) == hooked_costs(model, x)
    banked = sm.channel_groups
    wanted = {g.id: draw_mask(g) for g in banked}
    sm.set_masks(wanted)

    # what set_masks promises: the mask as given, except that an empty one keeps the largest-α channel
    got = sm.masks()
    assert set(got) == set(wanted)
    for gid, mask in wanted.items():
        expect = mask.clone()
        if not expect.any():
            expect[0] = True  # every α is 0 → argmax picks channel 0
        assert torch.equal(got[gid], expect), f"g{gid}: masks() {got[gid].tolist()} vs set {mask.tolist()}"
    masks = [got[g.id] for g in banked]  # by bank index

    with torch.no_grad():
        want = sm(x)
    exported = sm.export()

    # 3: only ordinary torch modules and no trace of the masks in the graph
    assert isinstance(exported, GraphModule)
    assert not exported.training
    assert_plain(exported)
    for node in exported.graph.nodes:
        assert not (callable(node.target) and getattr(node.target, "__module__", "").startswith("duccio_fx")), \
            f"duccio-fx function {node.target} left in the exported graph ({node.format_node()})"
        if node.op == "call_module":
            assert not str(node.target).startswith("duccio_"), f"mask node {node.format_node()} left in the graph"
            assert len(node.args) == 1 and not node.kwargs, f"{node.format_node()}: leftover mask argument"

    # 3: widths: the kept entries of the input / output layouts; and a conv / linear that produces group
    # members loses exactly those groups' removed channels.
    removed: dict[str, int] = {}
    for g, mask in zip(banked, masks):
        for member in g.members:
            removed[member.owner] = removed.get(member.owner, 0) + g.channels - int(mask.sum())
    original = dict(model.named_modules())
    layers = 0
    for node in sm.graph_module.graph.nodes:
        if node.op != "call_module":
            continue
        before = original.get(str(node.target))
        if not isinstance(before, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        layers += 1
        after = exported.get_submodule(str(node.target))
        assert type(after) is type(before), f"{node.target}: {type(before)} exported as {type(after)}"
        (in0, out0), (in1, out1) = _width(before), _width(after)
        lay_in, lay_out = channel_layout(node.args[0]), channel_layout(node)
        expect_in = kept_width(lay_in, got) if isinstance(lay_in, ChannelLayout) else in0
        expect_out = kept_width(lay_out, got) if isinstance(lay_out, ChannelLayout) else out0
        assert in1 == expect_in, f"{node.target}: {in1} input channels, the masks keep {expect_in}"
        assert out1 == expect_out, f"{node.target}: {out1} output channels, the masks keep {expect_out}"
        if str(node.target) in removed:  # a producer: independent of the layouts, through the group members
            assert out1 == out0 - removed[str(node.target)], \
                f"{node.target}: {out1} output channels, expected {out0} - {removed[str(node.target)]} removed"
        assert after.weight.shape[0] == out1, f"{node.target}: weight {tuple(after.weight.shape)}"
        if isinstance(before, nn.modules.conv._ConvNd) and before.groups > 1:
            depthwise = before.groups == before.in_channels
            assert after.groups == (after.in_channels if depthwise else before.groups), \
                f"{node.target}: groups {before.groups} → {after.groups} ({in0} → {in1} input channels)"

    # 1: same function in eval mode
    with torch.no_grad():
        out = exported(x)
    assert_close(out, want, "exported vs searchable")

    # 2: costs are the exported model's figures, exactly
    costs = sm.costs()
    params, macs = counted_costs(exported, x)
    assert hooked_costs(exported, x) == (params, macs), "the op-level and the module-hook counts disagree"
    assert exact_int(costs["params"], "costs()['params']") == params, (costs["params"], params)
    assert exact_int(costs["macs"], "costs()['macs']") == macs, (costs["macs"], macs)

    # 4: a saved and reloaded export computes the same
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, GraphModule) and not loaded.training
    assert_plain(loaded)
    with torch.no_grad():
        again = loaded(x)
    assert_close(again, out, "reloaded export vs export")
    assert counted_costs(loaded, x) == (params, macs)

    return {"groups": len(banked), "layers": layers,
            "removed": sum(int((~m).sum()) for m in masks)}


def _masks(data: st.DataObject):
    def draw(g: duccio_fx.ChannelGroup) -> torch.Tensor:
        kind = data.draw(st.sampled_from(["random", "random", "none", "all"]), label=f"g{g.id} mask kind")
        if kind == "none":
            return torch.zeros(g.channels, dtype=torch.bool)
        if kind == "all":
            return torch.ones(g.channels, dtype=torch.bool)
        bits = data.draw(st.lists(st.booleans(), min_size=g.channels, max_size=g.channels), label=f"g{g.id} mask")
        return torch.tensor(bits, dtype=torch.bool)
    return draw


def prepared(plan: Plan, seed: int, add_biases: bool) -> tuple[nn.Module, torch.Tensor]:
    model, x = build(plan)
    randomize(model, seed, add_biases)
    return model, x


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans(), seed=st.integers(0, 2**31 - 1), add_biases=st.booleans(), data=st.data())
def test_export_is_exact_and_costs_match(plan: Plan, seed: int, add_biases: bool, data: st.DataObject) -> None:
    model, x = prepared(plan, seed, add_biases)
    check_export(model, x, _masks(data))


def test_every_block_plan_with_real_pruning():
    """Guards against vacuity: the rich plan has many searchable groups and the masks really remove channels,
    every other channel of every group (and a group emptied entirely)."""
    model, x = prepared(EVERY_BLOCK, 1, True)
    first = []

    def draw(g: duccio_fx.ChannelGroup) -> torch.Tensor:
        if not first:
            first.append(g.id)
            return torch.zeros(g.channels, dtype=torch.bool)
        return torch.arange(g.channels) % 2 == 1

    stats = check_export(model, x, draw)
    assert stats["groups"] >= 8 and stats["removed"] >= 15 and stats["layers"] >= 15, stats


def test_conv1d_plan_with_real_pruning():
    plan = Plan(1, 4, 12, (("conv", 4, 8, 3, True, True), ("res", 8, 3, True, False), ("se", 8, 2),
                           ("cat", 8, 3, 5, False), ("pool", "avg"), ("dw", 8, 2, True, False)),
                ("flatten", "view", 5))
    model, x = prepared(plan, 2, True)
    stats = check_export(model, x, lambda g: torch.arange(g.channels) % 3 == 0)
    assert stats["groups"] >= 3 and stats["removed"] >= 5, stats
