"""Targets: schema errors, lookup (name, path, entry point), DORY-accounted layer memory, critical layers,
the GAP8 latency model, and a layer-wise search that brings critical layers under the level size."""

from __future__ import annotations

import json
import math
import textwrap
from importlib import metadata

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

import duccio_fx
from duccio_fx import zoo
from duccio_fx.cli import app
from duccio_fx.cli.target_report import target_report
from duccio_fx.costs.memory import critical_layers, layer_bytes, placement
from duccio_fx.costs.program import plain_costs
from duccio_fx.costs.terms import evaluate
from duccio_fx.ir.meta import layer_terms
from duccio_fx.costs.latency import LATENCY_MODELS
from duccio_fx.targets import Target, TargetError, list_targets, load_target, loader

runner = CliRunner()
GAP8 = load_target("gap8")


def values_of(model: nn.Module, x: torch.Tensor):
    return {v.term.name: v for v in evaluate(layer_terms(duccio_fx.analyze(model, x)))}


def board(l2_usable: int = 15_000, **latency: object) -> Target:
    """A small board: one layer-wise level of `l2_usable` bytes, GAP8 bit widths, no DORY quirk."""
    data = {
        "name": "tiny", "compute": {"cores": 1, "clock": "10MHz", "peak_macs_per_cycle": 1},
        "memory": [{"name": "L1", "size": 2000}, {"name": "L2", "size": l2_usable + 1000, "reserved": 1000,
                                                  "layerwise": True},
                   {"name": "L3", "size": "8MB", "bytes_per_cycle": 0.5}],
        "latency": {"model": "gap8-analytic", **latency},
    }
    return Target.model_validate(data)


# -- loading and validation ---------------------------------------------------------------------------

def test_builtin_targets_load_with_dory_numbers():
    names = {t.name for t in list_targets()}
    assert {"gap8", "gap9", "cortex_m7"} <= names
    assert [(m.name, m.size) for m in GAP8.memory] == [("L1", 64000), ("L2", 512000), ("L3", 8000000)]
    assert GAP8.level("L1").usable == 36_700  # DORY: 3 500 B stack for core 0 + 7 x 3 400 B
    assert GAP8.compute.clock == 100e6 and GAP8.compute.peak_macs_per_cycle == 32
    gap9 = load_target("gap9")
    assert gap9.level("L1").size == 120_000 and gap9.level("L2").size == 1_536_000 and gap9.compute.clock == 370e6
    assert load_target("cortex_m7").level("SRAM").holds == ("activations",)


GOOD_TOML = """
name = "myboard"
[compute]
cores = 2
clock = "64MHz"
peak_macs_per_cycle = 2
[[memory]]
name = "SRAM"
size = "256kB"
reserved = "16KiB"
layerwise = true
[[memory]]
name = "PSRAM"
size = "8MB"
bytes_per_cycle = 0.25
[latency]
model = "mac-rate"
macs_per_cycle = { conv = 1.0, depthwise = 0.5, linear = 1.0 }
"""


def test_user_file_by_path_with_units(tmp_path):
    path = tmp_path / "my_board.toml"
    path.write_text(GOOD_TOML)
    t = load_target(str(path))
    assert t.level("SRAM").size == 256_000 and t.level("SRAM").usable == 256_000 - 16_384
    assert t.compute.clock == 64e6


@pytest.mark.parametrize("edit, field, problem", [
    (("cores = 2\n", ""), "compute.cores", "missing required field"),
    (('size = "256kB"', "size = -5"), "memory[0] (SRAM).size", "greater than 0"),
    (("layerwise = true", "layerwise = true\nsise = 3"), "memory[0] (SRAM).sise", "unknown key"),
    (('clock = "64MHz"', 'clock = "64kB"'), "compute.clock", "unknown unit 'kB' for a frequency"),
    (('size = "256kB"', 'size = "256 furlongs"'), "memory[0] (SRAM).size", "unknown unit 'furlongs'"),
    (('size = "256kB"', 'size = "lots"'), "memory[0] (SRAM).size", "not a number"),
    (('size = "256kB"', 'size = inf'), "memory[0] (SRAM).size", "not a finite number"),
    (('reserved = "16KiB"', 'reserved = "300kB"'), "memory[0] (SRAM)", "must be smaller than size"),
    (('model = "mac-rate"', 'model = "magic"'), "latency.model", "unknown latency model 'magic'"),
    (("depthwise = 0.5, ", ""), "latency", "needs macs_per_cycle for depthwise"),
    (('name = "PSRAM"', 'name = "SRAM"'), "memory", "repeated: SRAM"),
])
def test_broken_target_files_name_file_field_and_problem(tmp_path, edit, field, problem):
    path = tmp_path / "broken.toml"
    text = GOOD_TOML.replace(*edit)
    assert text != GOOD_TOML
    path.write_text(text)
    with pytest.raises(TargetError) as info:
        load_target(str(path))
    err = info.value
    assert err.where == str(path)
    assert any(line.strip().startswith(field) and problem in line for line in err.what.splitlines()), err.what
    result = runner.invoke(app, ["targets", "validate", str(path)])
    assert result.exit_code == 1 and problem in result.output and "Traceback" not in result.output


def test_bad_toml_syntax_and_unknown_names(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(TargetError, match="not valid TOML.*line 1"):
        load_target(str(path))
    with pytest.raises(TargetError, match="unknown target 'gap7'") as info:
        load_target("gap7")
    assert "gap8" in info.value.fix
    with pytest.raises(TargetError, match="does not exist"):
        load_target("./nowhere.toml")


def test_entry_point_targets(monkeypatch, tmp_path):
    (tmp_path / "acme_boards.py").write_text(textwrap.dedent(f"""
        from duccio_fx.targets import validate_target_data
        import tomllib
        def board():
            return validate_target_data(tomllib.loads({GOOD_TOML.replace('myboard', 'acme')!r}), "acme")
        def broken():
            raise RuntimeError("no license")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [metadata.EntryPoint("acme", "acme_boards:board", loader.ENTRY_POINT_GROUP),
           metadata.EntryPoint("acme-path", str(tmp_path / "x.toml"), loader.ENTRY_POINT_GROUP),
           metadata.EntryPoint("cursed", "acme_boards:broken", loader.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(loader, "_entry_points", lambda: {e.name: e for e in eps})
    assert load_target("acme").name == "acme"
    assert "acme" in {t.name for t in list_targets()}
    with pytest.raises(TargetError, match="loading target 'cursed' failed: RuntimeError: no license"):
        load_target("cursed")


def test_targets_cli_list_show_validate(tmp_path):
    result = runner.invoke(app, ["targets", "list"])
    assert result.exit_code == 0 and "gap8" in result.output and "cortex_m7" in result.output
    result = runner.invoke(app, ["targets", "show", "gap8"])
    assert result.exit_code == 0 and "36,700" in result.output and "gap8-tiled" in result.output
    result = runner.invoke(app, ["targets", "show", "gap8", "--json"])
    shown = json.loads(result.output)
    assert Target.model_validate(shown) == GAP8  # the JSON is a complete, valid description
    path = tmp_path / "b.toml"
    path.write_text(GOOD_TOML)
    result = runner.invoke(app, ["targets", "validate", str(path)])
    assert result.exit_code == 0 and "myboard" in result.output
    assert runner.invoke(app, ["targets", "show", "gap7"]).exit_code == 1


# -- memory model ------------------------------------------------------------------------------------

def test_layer_memory_matches_hand_computed_dory_accounting():
    v = values_of(*zoo.build("resnet8"))
    # conv1: input 3x32x32 + output 16x32x32 (8 bit) + 16x3x3x3 weights + k, l (16 x 32 bit each)
    assert layer_bytes(v["conv1"], GAP8) == 3 * 32 * 32 + 16 * 32 * 32 + 432 + 2 * 16 * 4
    # head: no requantization; 32-bit outputs and biases
    assert layer_bytes(v["fc"], GAP8) == 64 + 10 * 4 + 640 + 10 * 4
    d = values_of(*zoo.build("dscnn"))
    # depthwise 64ch 3x3 on 25x5: DORY counts its weights 16x
    assert layer_bytes(d["blocks.0.dw"], GAP8) == 64 * 125 * 2 + 64 * 9 * 16 + 2 * 64 * 4
    # a level that holds only activations counts only them
    m7 = load_target("cortex_m7")
    assert layer_bytes(v["conv1"], m7, m7.level("SRAM")) == 3 * 32 * 32 + 16 * 32 * 32
    # size is what is stored (no accounting quirk): weights + k/l, head bias at 32 bit
    size = plain_costs([x.term for x in d.values()], GAP8)["size_bytes"]
    weights = sum(x.weights for x in d.values())
    assert size == weights + sum(2 * 64 * 4 for n in d if n != "fc") + 12 * 4


def test_transposed_conv_counts_output_activations_at_output_size():
    v = values_of(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 2, 1)),
                  torch.randn(1, 3, 8, 8))
    up = v["1"]
    assert up.macs == 8 * 4 * 4 * 64  # MACs scale with the input positions
    assert float(layer_bytes(up, GAP8)) == 8 * 64 + 4 * 256 + 8 * 4 * 4 + 2 * 4 * 4


def test_placement_and_critical_layers_at_several_slacks():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 32, 3, padding=1)
            self.c = nn.Conv2d(32, 64, 3, padding=1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))

    v = values_of(Net(), torch.randn(1, 3, 16, 16))
    need = {k: float(layer_bytes(x, GAP8)) for k, x in v.items()}
    assert need == {"a": 768 + 4096 + 432 + 128, "b": 4096 + 8192 + 4608 + 256,
                    "c": 8192 + 16384 + 18432 + 512, "fc": 64 + 40 + 640 + 40}
    t = board(l2_usable=12_000)
    # a 5 424 B and fc 784 B fit; b 17 152 B overflows by x1.43; c 43 520 B by x3.63
    assert {k: placement(x, t) for k, x in v.items()} == {"a": "L2", "b": "L3", "c": "L3", "fc": "L1"}
    vals = list(v.values())
    assert critical_layers(vals, t, 0.3) == {}
    assert critical_layers(vals, t, 0.6) == {"b": "L2"}
    assert critical_layers(vals, t, 0.9) == {"b": "L2"}
    assert critical_layers(vals, t, 2.7) == {"b": "L2", "c": "L2"}
    assert plain_costs([x.term for x in vals], t)["overflow_bytes"] == {"L2": (17152 - 12000) + (43520 - 12000)}


def test_inspect_with_target_shows_levels_and_critical_layers(tmp_path):
    model, x = zoo.build("resnet18_tinyimagenet")
    rep = target_report(duccio_fx.analyze(model, x), GAP8)
    layers = {r["name"]: r for r in rep["layers"]}
    assert layers["layer4.1.conv2"]["level"] == "L3" and layers["fc"]["level"] == "L2"
    crit = rep["totals"]["critical"]
    assert set(crit["0.3"]) < set(crit["0.6"]) <= set(crit["0.9"])
    assert all(380_000 < layers[n]["bytes"] <= 1.3 * 380_000 for n in crit["0.3"])
    result = runner.invoke(app, ["inspect", "zoo:resnet8", "--target", "gap8", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output)["target"]["layers"][0]["bytes"] == 20016
    path = tmp_path / "b.toml"
    path.write_text(GOOD_TOML)
    result = runner.invoke(app, ["inspect", "zoo:resnet8", "--target", str(path)])
    assert result.exit_code == 0 and "myboard" in result.output and "SRAM" in result.output
    result = runner.invoke(app, ["inspect", "zoo:resnet8", "--target", "gap7"])
    assert result.exit_code == 1 and "unknown target" in result.output


# -- latency -----------------------------------------------------------------------------------------

def test_gap8_cycles_match_the_formulas_by_hand():
    v = values_of(*zoo.build("resnet8"))
    gap8 = LATENCY_MODELS["gap8-analytic"]
    # conv1: Ho = Wo = 32, K = 9, Cin = 3, Cout = 16
    assert gap8(v["conv1"], GAP8) == 16 * 4 * (2 * 27 + 4 * (5 + 14 * math.ceil(27 / 4) + 10))
    assert gap8(v["fc"], GAP8) == math.ceil(64 / 2) * math.ceil(10 / 4)
    d = values_of(*zoo.build("dscnn"))
    assert gap8(d["blocks.0.dw"], GAP8) == 4 * 16 * 25 * 5 * 9


def test_latency_is_differentiable_and_charges_l3():
    model, x = zoo.build("resnet8")
    sm = duccio_fx.make_searchable(model, x)
    costs = sm.costs("gap8")
    costs["cycles"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sm.arch_parameters())
    assert costs["latency_s"] == costs["cycles"] / 100e6
    # the same layers on a board whose L2 is too small pay their bytes at L3's 0.5 B/cycle
    small = board(l2_usable=10_000)
    on_small = duccio_fx.make_searchable(model, x).costs(small)
    v = values_of(model, x)
    extra = sum(float(layer_bytes(x_, small, small.level("L2"))) / 0.5 for x_ in v.values()
                if float(layer_bytes(x_, small, small.level("L2"))) > 10_000)
    assert extra > 0
    plain = sum(float(LATENCY_MODELS["gap8-analytic"](x_, small)) for x_ in v.values())
    assert float(on_small["cycles"].detach()) == pytest.approx(plain + extra)
    no_charge = duccio_fx.make_searchable(model, x).costs(board(l2_usable=10_000, charge_next_level=False))
    assert float(no_charge["cycles"].detach()) == pytest.approx(plain)


@pytest.mark.parametrize("name", ["resnet8", "dscnn", "mobilenet_v1"])
def test_target_costs_of_search_equal_those_of_the_export(name):
    model, x = zoo.build(name)
    sm = duccio_fx.make_searchable(model, x)
    g = torch.Generator().manual_seed(1)
    sm.set_masks({grp.id: torch.rand(grp.channels, generator=g) < 0.6 for grp in sm.channel_groups})
    for target in (GAP8, load_target("cortex_m7")):
        with torch.no_grad():
            searched = sm.costs(target)
        exported = plain_costs(layer_terms(duccio_fx.analyze(sm.export(), x)), target)
        assert float(searched["size_bytes"]) == exported["size_bytes"]
        assert float(searched["cycles"]) == pytest.approx(exported["cycles"], rel=1e-12)
        assert {k: float(b) for k, b in searched["layer_bytes"].items()} == exported["layer_bytes"]


# -- layer-wise search -------------------------------------------------------------------------------

class ThreeConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.c = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.pool(F.relu(self.b(F.relu(self.a(x)))))
        return self.fc(F.relu(self.c(x)).mean((2, 3)))


@pytest.mark.slow
def test_layerwise_search_brings_critical_layers_under_the_level():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    t = board(l2_usable=14_000)
    sm = duccio_fx.make_searchable(ThreeConv(), x[:1])
    before = sm.cost_values(t)["layer_bytes"]
    # b (16->32 at 16x16): 17 152 B, critical at C = 0.3; c (32->32 at 8x8): 13 696 B fits
    critical = critical_layers(sm.layer_values(), t, 0.3)
    assert critical == {"b": "L2"} and before["c"] <= 14_000
    warm = torch.optim.Adam(list(sm.weight_parameters()), lr=1e-2)
    for _ in range(30):  # warmup: weights only
        loss = F.cross_entropy(sm(x), y)
        warm.zero_grad()
        loss.backward()
        warm.step()
    lam_target = loss.item() / (before["b"] - 14_000)  # DUCCIO: task loss / violation after warmup
    opt = torch.optim.Adam([{"params": list(sm.weight_parameters())},
                            {"params": list(sm.arch_parameters()), "lr": 0.01}], lr=1e-3)
    for step in range(120):
        layer = sm.costs(t)["layer_bytes"]
        penalty = sum(torch.relu(layer[n] - t.level(lvl).usable) for n, lvl in critical.items())
        loss = F.cross_entropy(sm(x), y) + min((step + 1) / 60, 1.0) * lam_target * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = sm.cost_values(t)["layer_bytes"]
    assert after["b"] <= 14_000 < before["b"]
    masks = sm.masks()
    group_of_c_out = next(g.id for g in sm.channel_groups if "c" in g.producers)
    assert bool(masks[group_of_c_out].all())  # the non-critical layer's own channels are left to the task loss
    assert all(int(m.sum()) > 4 for m in masks.values())  # shrunk to fit, not collapsed
