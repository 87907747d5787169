"""`duccio-fx inspect`: tables, JSON, IR dumps, and clear errors with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duccio_fx.cli import app

runner = CliRunner()

GOOD = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        return self.fc((a + self.b(a)).mean((2, 3)))

def build_model():
    return Net()

example_input = torch.randn(1, 3, 8, 8)
"""


def write(tmp_path: Path, text: str, name: str = "model.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_inspect_prints_layers_groups_and_totals(tmp_path):
    result = runner.invoke(app, ["inspect", str(write(tmp_path, GOOD))])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "layers" in out and "channel groups" in out and "totals" in out
    assert "model input 'x'" in out and "search" in out
    assert f"{3 * 8 * 9 * 64 + 8 * 8 * 9 * 64 + 32:,} MACs" in out


def test_inspect_json_is_machine_readable(tmp_path):
    result = runner.invoke(app, ["inspect", str(write(tmp_path, GOOD)), "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["totals"]["macs"] == 3 * 8 * 9 * 64 + 8 * 8 * 9 * 64 + 32
    assert report["totals"]["params"] == (3 * 8 * 9 + 8) + (8 * 8 * 9 + 8) + (8 * 4 + 4)
    coupled = [g for g in report["groups"] if set(g["producers"]) == {"a", "b"}]
    assert len(coupled) == 1 and not coupled[0]["frozen"] and coupled[0]["channels"] == 8
    a = next(layer for layer in report["layers"] if layer["name"] == "a")
    assert a["out_shape"] == [1, 8, 8, 8] and a["output_bytes"] == 8 * 64 * 4 and a["role"] == "defines"
    assert set(report["pass_seconds"]) == {"shape-propagation", "functional-layers", "channel-analysis", "layer-costs"}


def test_inspect_dump_ir_and_print_between_passes(tmp_path):
    dump = tmp_path / "ir"
    result = runner.invoke(app, ["inspect", "zoo:dscnn", "--dump-ir", str(dump), "--print-between-passes"])
    assert result.exit_code == 0
    steps = [p.stem.split("_", 1)[1] for p in sorted(dump.glob("*.txt"))]  # one file per pass, numbered in order
    assert steps[0] == "input" and steps[-1] == "layer-costs" and len(steps) == len(set(steps)) >= 4
    assert steps.index("shape-propagation") < steps.index("channel-analysis") < steps.index("layer-costs")
    assert "// ----- after layer-costs -----" in result.output


@pytest.mark.parametrize("content, message", [
    (None, "model file not found"),
    ("import torch\nx = 1\n", "defines no model"),
    ("import torch\nmodel = torch.nn.Conv2d\n", "not a torch.nn.Module"),
    ("import torch\nmodel = torch.nn.Conv2d(3, 4, 3)\n", "defines no example input"),
    ("import torch\nmodel = torch.nn.Conv2d(3, 4, 3)\nexample_input = torch.randn(1, 5, 8, 8)\n",
     "failed on its example input"),
    ("import torch\nmodel = torch.nn.Conv2d(3, 4, 3\n", "syntax error"),
    ("import torch\nimport no_such_package\n", "failed to import"),
    ("import torch\ndef build_model():\n    raise ValueError('bad config')\n", "build_model() raised ValueError"),
])
def test_bad_model_files_give_a_clear_error_and_exit_1(tmp_path, content, message):
    path = tmp_path / "model.py" if content is None else write(tmp_path, content)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_unknown_zoo_model_lists_the_zoo():
    result = runner.invoke(app, ["inspect", "zoo:resnet9"])
    assert result.exit_code == 1 and "resnet8" in result.output


def test_console_script_runs_and_fails_cleanly(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "duccio_fx.cli", "inspect", str(write(tmp_path, GOOD)), "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["model"] == "Net"
    bad = subprocess.run([sys.executable, "-m", "duccio_fx.cli", "inspect", str(tmp_path / "nope.py")],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "model file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_zoo_command_lists_models():
    result = runner.invoke(app, ["zoo"])
    assert result.exit_code == 0 and "resnet8" in result.output and "tcn" in result.output


def test_version_and_flags_in_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("duccio-fx ") and "torch" in result.output
    for command in ("optimize", "inspect", "lower"):
        text = runner.invoke(app, [command, "--help"]).output
        assert "<bool>" not in text and "--help" in text, command
