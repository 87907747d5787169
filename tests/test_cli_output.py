"""Lines a user copies (file paths, JSON) are printed whole by every command, even when the output goes to a
pipe, where a console assumes 80 columns (`duccio-fx plot runs/a | cat` must not split a file name)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from importlib import resources

import pytest
from typer.testing import CliRunner

from duccio_fx.cli import app
from tests.test_optimize import MODEL_FILE

runner = CliRunner()
NARROW = {"COLUMNS": "80"}


def _long_dir(tmp_path):
    return tmp_path / ("a-rather-long-directory-name-for-the-results-" * 3).rstrip("-")


def _whole(path, output: str) -> bool:
    return any(str(path) in line for line in output.splitlines())


def test_paths_are_printed_whole_at_80_columns(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    run = _long_dir(tmp_path) / "run"
    assert len(str(run)) > 160
    result = runner.invoke(app, ["optimize", str(model), "--max-size", "60%", "--epochs", "0,1,0", "--out", str(run),
                                 "--no-cache", "--device", "cpu"], env=NARROW)
    assert result.exit_code == 0, result.output
    files = json.loads((run / "report.json").read_text())["files"]
    assert files and all(_whole(path, result.output) for path in files.values()), result.output

    if importlib.util.find_spec("matplotlib"):
        assert _whole(run / "history.png", result.output)  # "plots: ..."
        plotted = runner.invoke(app, ["plot", str(run)], env=NARROW)
        assert plotted.exit_code == 0, plotted.output
        assert _whole(run / "history.png", plotted.output) and _whole(run / "layers.png", plotted.output)
        # a real pipe, as in `duccio-fx plot RUN | cat`
        piped = subprocess.run([sys.executable, "-m", "duccio_fx.cli", "plot", str(run)], capture_output=True,
                               text=True, env={**os.environ, **NARROW})
        assert piped.returncode == 0 and f"wrote {run / 'layers.png'}\n" in piped.stdout, piped.stdout

    dory = run.parent / "dory-output-directory"
    lowered = runner.invoke(app, ["lower", str(run), "--out", str(dory), "--calib-batches", "1"], env=NARROW)
    assert lowered.exit_code == 0, lowered.output
    assert _whole(f"wrote {dory}/:", lowered.output), lowered.output

    board = run.parent / "my-board-with-a-long-name.toml"
    board.write_text((resources.files("duccio_fx.targets") / "gap8.toml").read_text())
    checked = runner.invoke(app, ["targets", "validate", str(board)], env=NARROW)
    assert checked.exit_code == 0 and _whole(board, checked.output), checked.output


@pytest.mark.slow
def test_sweep_paths_are_printed_whole_at_80_columns(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent(MODEL_FILE))
    out = _long_dir(tmp_path) / "sweep"
    result = runner.invoke(app, ["sweep", str(model), "--size", "60%", "--epochs", "0,1,0", "--out", str(out),
                                 "--device", "cpu"], env=NARROW)
    assert result.exit_code == 0, result.output
    assert _whole(f"into {out}", result.output)
    assert _whole(f"wrote {out / 'sweep.json'} and {out / 'sweep.csv'}", result.output), result.output


@pytest.mark.parametrize("command", [["inspect", "zoo:dscnn", "--json"], ["targets", "show", "gap8", "--json"]])
def test_json_output_parses_at_80_columns(command):
    result = runner.invoke(app, command, env=NARROW)
    assert result.exit_code == 0 and json.loads(result.stdout)
