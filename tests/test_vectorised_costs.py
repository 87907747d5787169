"""The vectorised costs (one `CostProgram` evaluation over all layers) equal the layer-by-layer evaluation.

The reference below is how costs were built before they were vectorised: each layer's kept channels
counted from its channel spec (`evaluate`, one layer at a time), each cost formula applied to that layer
alone, totals and per-layer tables summed in Python. Values must be equal (exactly, where they are whole
numbers or binary fractions; to float rounding where a target divides by a clock or a MAC rate) and so must
the gradients w.r.t. the masks, on every zoo model and on generated networks, for the mask method and the
path method's mixture.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import duccio_fx
from duccio_fx import zoo
from duccio_fx.costs.latency import layer_cycles
from duccio_fx.costs.memory import constrained_layer_bytes, layer_bytes, layer_parameter_bytes
from duccio_fx.costs.program import plain_costs
from duccio_fx.costs.terms import LayerValues, evaluate
from duccio_fx.targets import Target, load_target
from tests.test_properties import build, plans

TARGETS = (None, "gap8", "cortex_m7")  # no target, the GAP8 cycle model, a mac-rate model


def reference(values: Sequence[LayerValues], target: Target | None) -> dict[str, Any]:
    """Totals and per-layer tables, layer by layer (the pre-vectorisation way)."""
    out: dict[str, Any] = {
        "layer_params": {v.term.name: v.params for v in values},
        "layer_macs": {v.term.name: v.macs for v in values},
        "layer_memory": {v.term.name: v.elements for v in values},
    }
    if target is not None:
        out["layer_size_bytes"] = {v.term.name: layer_parameter_bytes(v, target) for v in values}
        out["layer_bytes"] = {v.term.name: constrained_layer_bytes(v, target) for v in values}
        out["layer_cycles"] = {v.term.name: layer_cycles(v, target) for v in values}
        for m in target.layerwise_levels:
            over = [layer_bytes(v, target, m) - m.usable for v in values]
            out[f"overflow:{m.name}"] = sum(torch.relu(x) if isinstance(x, torch.Tensor) else max(0, x) for x in over)
    for table, total in (("layer_params", "params"), ("layer_macs", "macs"), ("layer_size_bytes", "size_bytes"),
                         ("layer_cycles", "cycles")):
        if table in out:
            out[total] = sum(out[table].values())
    if target is not None:
        out["latency_s"] = out["cycles"] / target.compute.clock
    return out


def vectorised(costs: duccio_fx.Costs) -> dict[str, Any]:
    out = {f: dict(getattr(costs, f)) for f in ("layer_params", "layer_macs", "layer_memory", "layer_size_bytes",
                                                "layer_bytes", "layer_cycles") if getattr(costs, f) is not None}
    for f in ("params", "macs", "size_bytes", "cycles", "latency_s"):
        if getattr(costs, f) is not None:
            out[f] = getattr(costs, f)
    for level, x in (costs.overflow_bytes or {}).items():
        out[f"overflow:{level}"] = x
    return out


def as_float(x: Any) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def assert_same(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, w in want.items():
        if isinstance(w, dict):
            assert got[key].keys() == w.keys(), f"{where}: {key}"
            for name in w:
                _same(as_float(got[key][name]), as_float(w[name]), f"{where}: {key}[{name}]")
        else:
            _same(as_float(got[key]), as_float(w), f"{where}: {key}")


def _same(got: float, want: float, where: str) -> None:
    if (want * 2 ** 20).is_integer():  # a whole number or a binary fraction: no rounding anywhere
        assert got == want, f"{where}: {got!r} != {want!r}"
    else:  # divided by a clock or a MAC rate: sums in another order round differently in the last bit
        assert math.isclose(got, want, rel_tol=1e-14), f"{where}: {got!r} != {want!r}"


def _random_masks(space: duccio_fx.SearchableModel, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    flat = (torch.rand(space.program().channels, generator=g) > 0.4).double()
    return flat.requires_grad_(True)


def check_mask_space(model: torch.nn.Module, x: torch.Tensor, seed: int,
                     targets: Sequence[str | None] = TARGETS) -> None:
    space = duccio_fx.make_searchable(model, x)
    program = space.program()
    sizes = [g.channels for g in space.channel_groups]
    for target in targets:
        hw = load_target(target) if target is not None else None
        masks = _random_masks(space, seed)
        got = vectorised(program.costs(masks, hw))
        masks_ref = masks.detach().clone().requires_grad_(True)
        kept = {g.id: m for g, m in zip(space.channel_groups, masks_ref.split(sizes))}
        want = reference(evaluate(space.terms, kept), hw)
        assert_same(got, want, f"{type(model).__name__} on {target}")
        if not sizes:
            continue  # nothing searchable: no gradient to compare
        # the gradient of every total at once, weighted so that no two cancel
        totals = [k for k in want if not isinstance(want[k], dict)]
        sum(got[k] * (1.0 + 0.37 * i) for i, k in enumerate(totals)).backward()
        sum(want[k] * (1.0 + 0.37 * i) for i, k in enumerate(totals)).backward()
        torch.testing.assert_close(masks.grad, masks_ref.grad, rtol=1e-12, atol=1e-18,
                                   msg=f"gradients differ on {target}")


@pytest.mark.parametrize("name", zoo.names())
def test_mask_costs_equal_layer_by_layer_on_the_zoo(name):
    model, x = zoo.build(name)
    check_mask_space(model, x, seed=zoo.names().index(name))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans(), seed=st.integers(0, 2**31 - 1))
def test_mask_costs_equal_layer_by_layer_on_generated_networks(plan, seed):
    model, x = build(plan)
    check_mask_space(model, x[:1], seed, targets=(None, "gap8"))


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet_v1", "tcn"])
def test_path_mixture_equals_the_picked_options_layer_by_layer(name):
    model, x = zoo.build(name)
    space = duccio_fx.make_searchable(model, x, method="path")
    hw = load_target("gap8")
    fixed = [t for t in space.layout if isinstance(t, duccio_fx.ir.meta.LayerTerm)]
    torch.manual_seed(3)
    space.resample()
    weights = space._weights().detach().requires_grad_(True)
    costs = space._mixture(hw).weighted(weights)
    picked = [o.terms for info, p in zip(space.infos, space.points()) for o in [info.options[int(p.sample.argmax())]]]
    want = reference(evaluate([*fixed, *(t for terms in picked for t in terms)]), hw)
    got = vectorised(costs)
    for table in [k for k, v in got.items() if isinstance(v, dict)]:  # layers of options not picked read 0
        assert all(as_float(v) == 0 for k, v in got[table].items() if k not in want[table]), table
        got[table] = {k: v for k, v in got[table].items() if k in want[table]}
    assert_same(got, want, name)
    # d(total)/d(weight of an option) is that option's own cost
    costs.cycles.backward()
    options = [o for info in space.infos for o in info.options]
    expected = torch.tensor([plain_costs(o.terms, hw).cycles for o in options], dtype=torch.float64)
    # the gradient has the weights' dtype (float32): the option cycles are not whole numbers, so it rounds there
    torch.testing.assert_close(weights.grad.double(), expected, rtol=torch.finfo(weights.dtype).eps * 4, atol=0)
