"""`duccio-fx sweep` and `duccio-fx plot`: a 3 x 2 grid with two workers shares one warmup, writes its
tables and the Pareto picture, runs again only what is missing, and survives a failing point."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from duccio_fx.cli import app
from duccio_fx.cli.sweep_cmd import build_grid
from tests.test_optimize import MODEL_FILE

runner = CliRunner()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model = root / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    out = root / "out"
    args = ["sweep", str(model), "--size", "40%,60%,80%", "--ops", "none,80%", "--workers", "2", "--epochs",
            "1,2,1", "--out", str(out), "--device", "cpu"]
    first = runner.invoke(app, args)
    return args, out, first


@pytest.mark.slow
def test_a_grid_runs_in_parallel_and_shares_one_warmup(swept):
    args, out, first = swept
    assert first.exit_code == 0, first.output
    rows = json.loads((out / "sweep.json").read_text())["points"]
    assert len(rows) == 6 and all(r["status"] == "met" for r in rows)
    assert len(list((out / "cache" / "warmup").glob("*.pt"))) == 1  # one warmup for the whole grid
    logs = [(out / r["run_dir"] / "optimize.log").read_text() for r in rows]
    assert sum("warmup: reused from the cache" in log for log in logs) == 5
    csv = (out / "sweep.csv").read_text().splitlines()
    assert csv[0].startswith("label,method,seed,size,ops,max_ops,status") and len(csv) == 7


@pytest.mark.slow
def test_ops_targets_are_taken_relative_to_the_size_only_run(swept):
    _, out, _ = swept
    rows = {(r["size"], r["ops"]): r for r in json.loads((out / "sweep.json").read_text())["points"]}
    for size in ("40%", "60%", "80%"):
        reference = rows[(size, None)]["macs"]
        assert int(rows[(size, "80%")]["max_ops"]) == int(reference * 0.8)
        assert rows[(size, "80%")]["macs"] <= int(reference * 0.8)


@pytest.mark.slow
def test_the_pareto_picture_and_the_run_plots_are_written(swept):
    pytest.importorskip("matplotlib")
    _, out, _ = swept
    assert (out / "pareto.png").stat().st_size > 10_000
    run = next((out / "points").iterdir())
    assert {p.name for p in run.glob("*.png")} == {"history.png", "layers.png"}  # optimize draws its own
    again = runner.invoke(app, ["plot", str(run)])
    assert again.exit_code == 0 and "history.png" in again.output


@pytest.mark.slow
def test_running_again_finishes_only_the_missing_point(swept):
    args, out, _ = swept
    missing = out / "points" / "mask_seed0_size-60pct_ops-80pct"
    (missing / "report.json").unlink()  # as if the sweep had been killed before this point finished
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("finished earlier") == 5
    assert "mask_seed0_size-60pct_ops-80pct: met" in second.output


@pytest.mark.slow
def test_a_failing_point_does_not_stop_the_others(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    result = runner.invoke(app, ["sweep", str(model), "--size", "0.5%,60%", "--epochs", "0,1,0", "--out",
                                 str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 3, result.output
    rows = {r["size"]: r for r in json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]}
    assert rows["0.5%"]["status"] == "failed" and "cannot be met" in rows["0.5%"]["error"]
    assert rows["60%"]["status"] == "met"


def test_bad_grids_and_directories_are_refused():
    with pytest.raises(Exception, match="neither a size nor an ops bound"):
        build_grid("mask", "0", "none", "none", "seed")
    bad = runner.invoke(app, ["sweep", "x.py", "--method", "nope"])
    assert bad.exit_code == 1 and "unknown search method" in bad.output
    bad = runner.invoke(app, ["plot", "/nonexistent-dir"])
    assert bad.exit_code == 1 and "neither a finished run" in bad.output


def test_points_run_as_ray_tasks(tmp_path):
    """Only where Ray is installed (`pip install "duccio-fx[ray]"`): a local Ray runs the points."""
    pytest.importorskip("ray")
    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    result = runner.invoke(app, ["sweep", str(model), "--size", "40%,60%", "--epochs", "0,1,0", "--out",
                                 str(tmp_path / "out"), "--device", "cpu", "--ray", "auto"])
    assert result.exit_code == 0, result.output
    assert "as Ray tasks (auto)" in result.output
    rows = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert [r["status"] for r in rows] == ["met", "met"]


def test_ctrl_c_starts_no_new_point(monkeypatch, tmp_path):
    """After Ctrl-C the running points stop (they got the signal too) and the queued ones never start."""
    from duccio_fx.cli import sweep_cmd

    started = []

    def fake(spec, p):
        started.append(p.label)
        if len(started) == 1:
            raise KeyboardInterrupt
        return p

    monkeypatch.setattr(sweep_cmd, "run_point", fake)
    spec = sweep_cmd.SweepSpec(model="m.py", out=tmp_path, target="gap8", epochs="1,1,1", ops_of="seed", workers=1,
                               device="cpu")
    points = build_grid("mask", "0", "20%,40%,60%,80%", "none", "seed")
    with pytest.raises(KeyboardInterrupt):
        sweep_cmd.local_executor(spec, points)
    assert started == [points[0].label]
