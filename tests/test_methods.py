"""Search methods are registered by name and reached only through the `SearchSpace` protocol; the whole
optimize flow (analysis, mask insertion, export, analysis of the result) is visible to the IR instruments."""

from __future__ import annotations

import copy
import json
from typing import Any, Iterator, Sequence

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx.cli import app
from duccio_fx.ir.meta import LayerTerm, layer_terms
from duccio_fx.pipeline import graph_costs
from duccio_fx.search import space as space_module
from tests.test_optimize import model_file, recipe

runner = CliRunner()


class KeepSeed(duccio_fx.SearchSpace):
    """A toy method: searches nothing (no architecture parameters) and exports the seed as it is."""

    def __init__(self, model: nn.Module, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.model, self.gm = model, gm

    def forward(self, *args: Any) -> Any:
        return self.model(*args)

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())

    def costs(self, target: Any = None) -> duccio_fx.Costs:
        return graph_costs(self.gm, duccio_fx.load_target(target) if target is not None else None).tensors()

    def minimum_costs(self, target: Any = None) -> duccio_fx.Costs:
        return graph_costs(self.gm, target)

    @property
    def seed_terms(self) -> Sequence[LayerTerm]:
        return layer_terms(self.gm)

    def export(self, context: Any = None) -> nn.Module:
        return torch.fx.symbolic_trace(copy.deepcopy(self.model))  # a GraphModule: it pickles anywhere


@pytest.fixture
def keep_seed():
    """Registers the toy method for one test only."""
    @duccio_fx.register_search_method("keep-seed")
    def make(model: nn.Module, example_inputs: Any, *, leaf_modules: Sequence[Any] = (),
             context: duccio_fx.PassContext | None = None) -> KeepSeed:
        model = copy.deepcopy(model)
        return KeepSeed(model, duccio_fx.analyze(model, example_inputs, leaf_modules, context=context))

    yield "keep-seed"
    space_module._METHODS.pop("keep-seed")


def test_mask_and_path_are_registered_methods():
    assert {"mask", "path"} <= set(duccio_fx.search_methods())
    seed = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    sm = duccio_fx.make_searchable(seed, torch.randn(1, 1, 8, 8))
    assert isinstance(sm, duccio_fx.SearchSpace) and sm.method == "mask"
    sp = duccio_fx.make_searchable(seed, torch.randn(1, 1, 8, 8), method="path")
    assert isinstance(sp, duccio_fx.SearchSpace) and sp.method == "path" and sp.choices() == {"2": "conv3"}
    with pytest.raises(duccio_fx.DuccioError, match="unknown search method 'paths'"):
        duccio_fx.make_searchable(nn.Conv2d(1, 2, 3), torch.randn(1, 1, 4, 4), method="paths")


def test_a_new_method_is_one_registration_and_the_recipe_runs_it(tmp_path, keep_seed):
    assert keep_seed in duccio_fx.search_methods()
    result = recipe(tmp_path, constraints=[duccio_fx.Constraint.parse("macs", "100%")], method=keep_seed).run()
    assert result.met and result.searchable.method == keep_seed
    assert result.final_costs.macs == result.seed_costs.macs  # it searched nothing
    # an infeasible bound is refused through the protocol alone (minimum_costs), naming what cannot shrink
    with pytest.raises(duccio_fx.DuccioError, match="cannot be met"):
        recipe(tmp_path, constraints=[duccio_fx.Constraint.parse("macs", "50%")], method=keep_seed)


def test_optimize_runs_a_registered_method_from_the_command_line(tmp_path, keep_seed):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--method", keep_seed, "--max-ops", "100%",
                                 "--epochs", "1,1,1", "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == keep_seed and report["status"] == "met"
    assert report["final"]["macs"] == report["seed"]["macs"]
    listed = runner.invoke(app, ["methods"])
    assert keep_seed in listed.output and "mask" in listed.output


def test_unknown_method_is_refused_on_the_command_line(tmp_path):
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--method", "paths", "--max-size", "50%",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "unknown search method 'paths'" in result.output and "mask" in result.output


FLOW = ["000_input.txt", "001_shape-propagation.txt", "002_functional-layers.txt", "003_channel-analysis.txt",
        "004_layer-costs.txt", "005_mask-insertion.txt", "006_shrink-export.txt", "007_shape-propagation.txt",
        "008_functional-layers.txt", "009_channel-analysis.txt", "010_layer-costs.txt"]


def test_optimize_dumps_the_ir_after_every_pass_of_the_flow(tmp_path):
    out, dump = tmp_path / "run", tmp_path / "ir"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--epochs", "0,1,0",
                                 "--out", str(out), "--no-cache", "--dump-ir", str(dump), "--print-between-passes"])
    assert result.exit_code in (0, 3), result.output
    assert sorted(p.name for p in dump.iterdir()) == FLOW
    inserted = (dump / "005_mask-insertion.txt").read_text()
    assert "MaskBank 'duccio_masks'()" in inserted and "mask(g" in inserted
    exported = (dump / "006_shrink-export.txt").read_text()
    assert "duccio_mask" not in exported and "mask(g" not in exported
    final = (dump / "010_layer-costs.txt").read_text()  # the exported model, analysed: its own (smaller) widths
    assert "params=" in final and final != (dump / "004_layer-costs.txt").read_text()
    assert "// ----- after mask-insertion -----" in result.output
    assert "// ----- after shrink-export -----" in result.output


def test_one_pass_context_numbers_the_passes_of_several_pipelines(tmp_path):
    ctx = duccio_fx.PassContext([duccio_fx.DumpIR(tmp_path)])
    sm = duccio_fx.make_searchable(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)),
                                   torch.randn(1, 1, 8, 8), context=ctx)
    sm.export(ctx)
    assert sorted(p.name for p in tmp_path.iterdir()) == FLOW[:7]


def test_a_pass_that_lacks_its_requirement_is_refused():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
    with pytest.raises(duccio_fx.PassError, match="'channel-analysis' needs 'shape-propagation'"):
        duccio_fx.PassManager([duccio_fx.passes.ChannelAnalysis()]).run(gm)


def test_searchable_model_keeps_its_annotations_through_save_and_load(tmp_path):
    sm = duccio_fx.make_searchable(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)),
                                   torch.randn(1, 1, 8, 8))
    before = duccio_fx.format_ir(sm.graph_module)
    torch.save(sm, tmp_path / "sm.pt")
    loaded = torch.load(tmp_path / "sm.pt", weights_only=False)
    after = duccio_fx.format_ir(loaded.graph_module)
    assert after.splitlines()[1:] == before.splitlines()[1:] and "mask(g" in before  # line 0: the class name
    assert isinstance(loaded.export(), torch.fx.GraphModule)


def test_optimize_help_names_the_flow_instruments():
    help_text = runner.invoke(app, ["optimize", "--help"]).output
    assert "--method" in help_text and "--dump-ir" in help_text and "--print-between-passes" in help_text


@pytest.mark.slow
def test_a_backend_is_one_registration_and_optimize_writes_its_files(tmp_path):
    @duccio_fx.register_backend("param-count")
    def lower_counts(model: nn.Module, example_inputs: Any, target: Any, context: Any) -> duccio_fx.Lowered:
        count = sum(p.numel() for p in model.parameters())
        return duccio_fx.Lowered({"params.txt": f"{count}\n".encode()}, {"params": float(count)})

    try:
        assert {"onnx", "param-count"} <= set(duccio_fx.backends())
        out = tmp_path / "run"
        result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--epochs", "1,2,1",
                                     "--out", str(out), "--no-cache", "--backend", "onnx", "--backend", "param-count"])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        model = torch.load(out / "model.pt", weights_only=False)
        assert int((out / "params.txt").read_text()) == sum(p.numel() for p in model.parameters())
        assert report["checks"]["params"] == float((out / "params.txt").read_text())
        assert report["files"]["param-count"].endswith("params.txt") and (out / "model.onnx").exists()
        assert report["onnx_max_abs_diff"] < 1e-4
    finally:
        from duccio_fx.lower import backend as backend_module

        backend_module._BACKENDS.pop("param-count")


def test_unknown_backend_is_refused_before_training(tmp_path):
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--backend", "dory",
                                 "--out", str(tmp_path / "o"), "--no-cache"])
    assert result.exit_code == 1 and "unknown backend 'dory'" in result.output and "onnx" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_failing_backend_is_named_and_writes_nothing(tmp_path):
    @duccio_fx.register_backend("broken")
    def lower_broken(model: nn.Module, example_inputs: Any, target: Any, context: Any) -> duccio_fx.Lowered:
        raise RuntimeError("unsupported op: aten::boom")

    try:
        out = tmp_path / "run"
        result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--epochs", "1,2,1",
                                     "--out", str(out), "--no-cache", "--backend", "onnx", "--backend", "broken"])
        assert result.exit_code == 1 and "backend 'broken' failed: RuntimeError: unsupported op" in result.output
        assert "Traceback" not in result.output
        assert not any((out / name).exists() for name in ("model.pt", "model.onnx", "report.json"))
    finally:
        from duccio_fx.lower import backend as backend_module

        backend_module._BACKENDS.pop("broken")


@pytest.mark.slow
def test_an_export_that_cannot_be_saved_is_a_clear_error(tmp_path, keep_seed, monkeypatch):
    monkeypatch.setattr(KeepSeed, "export", lambda self, context=None: copy.deepcopy(self.model))  # the file's class
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--method", keep_seed, "--max-ops", "100%",
                                 "--epochs", "0,1,0", "--out", str(out), "--no-cache"])
    assert result.exit_code == 1 and "the exported model cannot be saved" in result.output
    assert "Traceback" not in result.output and not (out / "model.pt").exists()


PATH_FLOW = ["000_input.txt", "001_shape-propagation.txt", "002_functional-layers.txt", "003_channel-analysis.txt",
             "004_layer-costs.txt", "005_supernet-insertion.txt", "006_choice-export.txt", "007_shape-propagation.txt",
             "008_functional-layers.txt", "009_channel-analysis.txt", "010_layer-costs.txt"]


@pytest.mark.slow
def test_optimize_path_dumps_supernet_insertion_and_choice_export(tmp_path):
    out, dump = tmp_path / "run", tmp_path / "ir"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--method", "path", "--max-size", "60%",
                                 "--epochs", "1,1,0", "--out", str(out), "--no-cache", "--dump-ir", str(dump)])
    assert result.exit_code in (0, 3), result.output
    assert sorted(p.name for p in dump.iterdir()) == PATH_FLOW
    assert "choice(" in (dump / "005_supernet-insertion.txt").read_text()
    assert "choice(" not in (dump / "006_choice-export.txt").read_text()
