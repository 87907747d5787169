"""What a new user tripped over: a finished run resumed, an output folder lowered over, a seed lowered as if
trained, a result that left most of its budget unused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from duccio_fx.cli import app
from tests.test_optimize import model_file

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run whose one search epoch (a huge architecture lr and λ) overshot its 90 % size bound."""
    root = tmp_path_factory.mktemp("new-user")
    args = ["optimize", model_file(root), "--max-size", "90%", "--epochs", "0,1,0", "--max-search-epochs", "1",
            "--arch-lr", "2", "--constant-lambda", "5", "--out", str(root / "run"), "--no-cache"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return root, args, result


def test_a_result_far_below_its_bound_notes_that_more_search_epochs_would_use_the_budget(run):
    root, _, result = run
    report = json.loads((root / "run" / "report.json").read_text())
    (c,) = report["constraints"]
    assert c["final"] < 0.6 * c["bound"] < c["seed"]
    share = f"{c['final'] / c['bound']:.0%}"
    (use,) = report["bound_use"]
    under = ["size ends at"] if use["under_spent"] else []  # (also less accurate than the untrained seed)
    assert [n[:12] for n in report["notes"][:-1]] == under
    assert report["notes"][-1] == (
        f"size ends at {share} of its bound ({c['final']:,.0f} B of {c['bound']:,.0f} B): more search epochs (a larger "
        "S in --epochs W,S,F than 1, or --max-search-epochs) would let the search use the budget left for accuracy")
    assert f"note: {report['notes'][-1]}" in result.output


def test_resume_on_a_finished_run_says_it_is_finished(run):
    root, args, _ = run
    before = (root / "run" / "report.json").stat().st_mtime_ns
    again = runner.invoke(app, args + ["--resume"])
    assert again.exit_code == 0, again.output
    assert f"{root / 'run'} holds a finished run (status: met): nothing to resume" in again.output
    assert "warmup" not in again.output and "search 1" not in again.output  # nothing trained again
    assert (root / "run" / "report.json").stat().st_mtime_ns == before


def test_lower_refuses_an_output_folder_that_is_not_empty_unless_forced(run):
    root, _, _ = run
    out = root / "dory"
    out.mkdir()
    (out / "out_layer9.txt").write_text("0\n")  # a file of an earlier lowering with more layers
    refused = runner.invoke(app, ["lower", str(root / "run"), "--out", str(out), "--calib-batches", "1"])
    assert refused.exit_code == 1 and f"{out} already exists and is not empty" in refused.output
    assert "--force" in refused.output and sorted(p.name for p in out.iterdir()) == ["out_layer9.txt"]
    forced = runner.invoke(app, ["lower", str(root / "run"), "--out", str(out), "--calib-batches", "1", "--force"])
    assert forced.exit_code == 0, forced.output
    layers = len(json.loads((out / "lowering.json").read_text())["layers"])
    assert layers < 9 and sorted(p.name for p in out.glob("out_layer*.txt")) == \
        sorted(f"out_layer{i}.txt" for i in range(layers))  # the stale file is gone
    assert "not a finished run" not in forced.output  # a run's weights are trained: no warning


@pytest.mark.parametrize("source, weights", [
    ("model", "as the model file builds them: untrained, unless the file loads trained weights"),
    ("zoo:dscnn", "random: the zoo has no trained weights"),
])
def test_lower_of_a_model_file_warns_that_its_weights_are_untrained(run, source, weights):
    root, _, _ = run
    source = str(root / "tiny.py") if source == "model" else source
    out = root / f"dory-{source.replace(':', '-').replace('/', '-')}"
    result = runner.invoke(app, ["lower", source, "--out", str(out), "--calib-batches", "1"])
    assert result.exit_code == 0, result.output
    assert f"note: {source} is not a finished run; its weights are {weights}" in result.output
    assert json.loads((out / "lowering.json").read_text())["weights"].startswith(("as the model file", "random"))


def test_lower_of_a_run_whose_target_cannot_be_loaded_asks_for_target(tmp_path):
    """A report written before runs recorded their target file names only the target ('tiny', a TOML file's
    name): lower says so instead of lowering for gap8."""
    import torch

    from duccio_fx import zoo

    (tmp_path / "report.json").write_text(json.dumps({"source": "zoo:dscnn", "target": "tiny"}))
    torch.save(zoo.build("dscnn")[0], tmp_path / "model.pt")
    result = runner.invoke(app, ["lower", str(tmp_path), "--out", str(tmp_path / "dory")])
    assert result.exit_code == 1
    assert "the target this run was searched on ('tiny') cannot be loaded: unknown target 'tiny'" in result.output
    assert "pass --target" in result.output and not (tmp_path / "dory").exists()


def test_bound_use_flags_a_result_far_under_its_bound_and_less_accurate_than_the_seed():
    """Issue 22's bound tracking: under 70 % of a binding bound with less accuracy than the seed after warmup
    is a search failure (reported and noted); as accurate as the seed, or close to the bound, is not."""
    from duccio_fx.cli.optimize_view import bound_use, budget_notes
    from duccio_fx.search.settings import SearchSettings

    def report(final: float, accuracy: float, seed_accuracy: float = 0.95) -> dict:
        c = {"constraint": "size", "metric": "size", "scope": None, "bound": 100.0, "seed": 200.0, "final": final,
             "met": final <= 100.0}
        r = {"status": "met", "method": "path", "constraints": [c], "seed": {"val_metric_after_warmup": seed_accuracy},
             "final": {"val_metric": accuracy}}
        r["bound_use"] = bound_use(r)
        return r

    flagged = report(57.0, 0.94)
    assert flagged["bound_use"] == [{"constraint": "size", "use": 0.57, "under_spent": True}]
    assert budget_notes(flagged, SearchSettings())[0].startswith(
        "size ends at 57% of its bound with less accuracy than the seed (0.9400, the seed 0.9500 after warmup): "
        "the path search gave up accuracy it had budget for")
    assert not report(57.0, 0.96)["bound_use"][0]["under_spent"]  # as accurate as the seed: fine
    assert not report(75.0, 0.90)["bound_use"][0]["under_spent"]  # uses the budget
    assert report(120.0, 0.9)["bound_use"][0]["under_spent"] is False  # violated: reported as such elsewhere
