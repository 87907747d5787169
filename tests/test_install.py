"""The install layout: `passes/` and `targets/` ship as `duccio_fx.passes` / `duccio_fx.targets`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_or_source_install_maps_the_top_level_folders():
    import duccio_fx.passes
    import duccio_fx.targets

    assert Path(duccio_fx.passes.__file__).parent.name == "passes"
    assert Path(duccio_fx.targets.__file__).parent.name == "targets"


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_wheel_contains_passes_and_targets_under_duccio_fx(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("duccio_fx-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("duccio_fx/__init__.py", "duccio_fx/passes/channel_analysis.py",
                     "duccio_fx/passes/shape_propagation.py", "duccio_fx/targets/__init__.py",
                     "duccio_fx/targets/gap8.toml", "duccio_fx/targets/gap9.toml", "duccio_fx/targets/cortex_m7.toml",
                     "duccio_fx/zoo/resnet8.py", "duccio_fx/common/errors.py", "duccio_fx/ir/meta.py",
                     "duccio_fx/costs/model.py", "duccio_fx/pipeline.py", "duccio_fx/search/space.py",
                     "duccio_fx/lower/backend.py", "duccio_fx/cli/app.py", "duccio_fx/passes/mask_insertion.py"):
        assert required in names
    assert not any(n.startswith(("passes/", "targets/", "tests/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "duccio-fx = duccio_fx.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
