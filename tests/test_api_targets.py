"""Everywhere the Python API takes a target, a target name or a TOML path works as well as a Target."""

from __future__ import annotations

from importlib import resources

import pytest
import torch
from torch import nn

import duccio_fx
from duccio_fx.search.constraints import Constraint
from duccio_fx.search.feasibility import check_feasible
from duccio_fx.search.recipe import Recipe
from duccio_fx.search.settings import SearchSettings
from duccio_fx.targets import load_target


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3))


def _board(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text((resources.files("duccio_fx.targets") / "gap8.toml").read_text()
                    .replace('name = "gap8"', 'name = "board"').replace('clock = "100MHz"', 'clock = "50MHz"'))
    return path


def test_measure_costs_takes_a_target_name_or_path_and_a_single_tensor(tmp_path):
    model, x = _model(), torch.randn(1, 1, 8, 8)
    reference = duccio_fx.measure_costs(model, (x,), load_target("gap8"))
    by_name = duccio_fx.measure_costs(model, x, "gap8")  # the call a new user tried first
    assert by_name["size_bytes"] == reference["size_bytes"] and by_name["latency_s"] == reference["latency_s"]
    assert by_name["size_bytes"] > 0
    board = _board(tmp_path)
    for spec in (str(board), board):
        slower = duccio_fx.measure_costs(model, (x,), spec)
        assert slower["cycles"] == reference["cycles"]
        assert slower["latency_s"] == pytest.approx(2 * reference["latency_s"])  # half the clock
    with pytest.raises(duccio_fx.DuccioError, match="unknown target 'gap7'"):
        duccio_fx.measure_costs(model, x, "gap7")


def test_the_feasibility_check_and_the_recipe_take_a_target_name():
    model, x = _model(), torch.randn(1, 1, 8, 8)
    sm = duccio_fx.make_searchable(model, x)
    c = Constraint.parse("size", "50%").resolve(sm.cost_values("gap8"))
    assert check_feasible(sm, [c], "gap8") == check_feasible(sm, [c], load_target("gap8"))
    data = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))]
    r = Recipe(model, (x,), data, data, [Constraint.parse("latency", "95%")], "gap8",
               SearchSettings(warmup_epochs=0, search_epochs=1, finetune_epochs=0), device="cpu")
    assert r.target == load_target("gap8") and r.seed_costs["latency_s"] > 0


@pytest.mark.parametrize("method", ["mask", "path"])
def test_minimum_costs_take_a_target_name(method):
    sm = duccio_fx.make_searchable(_model(), torch.randn(1, 1, 8, 8), method=method)
    assert sm.minimum_costs("gap8")["size_bytes"] == sm.minimum_costs(load_target("gap8"))["size_bytes"] > 0
