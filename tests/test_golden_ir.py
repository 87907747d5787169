"""Golden IR tests: the IR dumped after every pass of the whole flow, compared as text with tests/golden/.

For each model the flow is the one of a search: analysis passes and mask insertion (`make_searchable`),
fixed pseudo-random masks, then `export` (shrink-export) and the analysis of the exported model (whose
shapes show which channels were kept), all in one `PassContext` carrying a `DumpIR`, so the files are `000_input.txt`, `001_shape-propagation.txt`, ... in flow order. Every file must equal
`tests/golden/<model>/<file>` exactly, and the set of files must match (a new, renamed or missing pass
shows up as a mismatch).

Regenerate after an intended change, then review `git diff tests/golden`:

    python -m pytest -q tests/test_golden_ir.py --update-golden
    DUCCIO_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden_ir.py
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Mapping

import pytest
import torch

import duccio_fx
from duccio_fx import zoo
from duccio_fx.ir import printer
from duccio_fx.ir.meta import COST_KEY

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
REPO_ROOT = GOLDEN_DIR.parent.parent

# Chosen to cover the graph shapes the passes must handle (each runs the whole flow in well under a second).
MODELS = [
    "lenet5",              # flatten into Linear
    "resnet8",             # residual adds
    "dscnn",               # depthwise convs
    "shufflenet_like",     # chunk / cat / view-transpose-view channel shuffle
    "densenet",            # nested torch.cat
    "mobilenet_v3_small",  # squeeze-excite (mul by a gate)
]

MASK_SEED = 0
DIFF_LINES = 60
ENV_VAR = "DUCCIO_UPDATE_GOLDEN"
REGENERATE = (f"If the change is intended, regenerate the golden files and review them:\n"
              f"    python -m pytest -q tests/test_golden_ir.py --update-golden\n"
              f"    (or {ENV_VAR}=1 python -m pytest -q tests/test_golden_ir.py), then `git diff tests/golden`")
# Memory addresses (`0x7f...`, `<... object at 0x...>`) would make the dumps differ from run to run.
ADDRESS = re.compile(r"0x[0-9a-fA-F]+|object at ")


class GoldenUpdatedWarning(UserWarning):
    """Golden files were rewritten (update mode): the test passed without comparing."""


# -- the flow and its dump -----------------------------------------------------------------------------
def run_flow(model_name: str, outdir: Path) -> dict[str, str]:
    """Run analysis → mask-insertion → shrink-export → analysis of the export, with a DumpIR; {file: text}."""
    model, x = zoo.build(model_name)
    ctx = duccio_fx.PassContext([duccio_fx.DumpIR(outdir)])
    sm = duccio_fx.make_searchable(model, x, context=ctx)
    g = torch.Generator().manual_seed(MASK_SEED)
    sm.set_masks({grp.id: torch.rand(grp.channels, generator=g) < 0.5 for grp in sm.channel_groups})
    duccio_fx.analyze(sm.export(ctx), x, context=ctx)
    return read_dir(outdir)


def read_dir(directory: Path) -> dict[str, str]:
    """The `.txt` files of a dump or golden directory (not DumpIR's hidden temporaries), by name."""
    if not directory.is_dir():
        return {}
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.txt"))}


# -- comparison ----------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def golden_mismatch(actual: Mapping[str, str], expected: Mapping[str, str], model: str,
                    golden_dir: Path | None = None) -> str | None:
    """None if `actual` equals `expected` exactly (same file names, same texts); else a readable report:
    the file sets' differences, the differing files, a unified diff of the first one and how to regenerate."""
    golden_dir = golden_dir if golden_dir is not None else GOLDEN_DIR / model
    if not expected:
        return (f"no golden IR files for {model} in {_shown(golden_dir)} "
                f"(the flow dumped {len(actual)}: {', '.join(actual)}).\n{REGENERATE}")
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    differing = [name for name in sorted(set(actual) & set(expected)) if actual[name] != expected[name]]
    if not (missing or extra or differing):
        return None
    lines = [f"golden IR mismatch for {model} ({_shown(golden_dir)}):"]
    if missing:
        lines.append(f"  files in the golden set but not dumped by the flow: {', '.join(missing)}")
    if extra:
        lines.append(f"  files dumped by the flow but not in the golden set: {', '.join(extra)}")
    if differing:
        lines.append(f"  files whose text differs: {', '.join(differing)}")
        first = differing[0]
        diff = list(difflib.unified_diff(expected[first].splitlines(), actual[first].splitlines(),
                                         fromfile=_shown(golden_dir / first), tofile=f"flow output/{first}",
                                         lineterm="", n=2))
        lines.append(f"first differing file: {first}")
        lines.extend(diff[:DIFF_LINES])
        if len(diff) > DIFF_LINES:
            lines.append(f"... ({len(diff) - DIFF_LINES} more diff lines)")
    lines.append(REGENERATE)
    return "\n".join(lines)


# -- update mode ---------------------------------------------------------------------------------------
def update_requested(config: pytest.Config) -> bool:
    flag = bool(config.getoption("--update-golden", default=False))
    return flag or os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def write_golden(model: str, files: Mapping[str, str]) -> str:
    """Replace tests/golden/<model>/ with `files` (stale files removed); return a summary of the change."""
    directory = GOLDEN_DIR / model
    old = read_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in sorted(set(old) - set(files)):
        (directory / stale).unlink()
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8", newline="\n")
    changed = sum(1 for n in files if n in old and old[n] != files[n])
    added, removed = len(set(files) - set(old)), len(set(old) - set(files))
    return f"{_shown(directory)}: {len(files)} files ({changed} changed, {added} added, {removed} removed)"


def check_storable(model: str, first: Mapping[str, str], second: Mapping[str, str]) -> None:
    """Golden files must be reproducible: two runs agree and no memory address appears."""
    if first != second:
        pytest.fail(f"the IR dumps of {model} differ between two runs; not writing golden files\n"
                    + (golden_mismatch(second, first, model) or ""), pytrace=False)
    for name, text in first.items():
        m = ADDRESS.search(text)
        if m:
            line = text.count("\n", 0, m.start()) + 1
            pytest.fail(f"{model}/{name}:{line} prints something address-like ({m.group()!r}); "
                        "not writing golden files", pytrace=False)


# -- the tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_golden_ir(model: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    actual = run_flow(model, tmp_path / "run1")
    if update_requested(request.config):
        check_storable(model, actual, run_flow(model, tmp_path / "run2"))
        summary = write_golden(model, actual)
        warnings.warn(GoldenUpdatedWarning(f"golden IR regenerated (not compared): {summary}"))
        return
    problem = golden_mismatch(actual, read_dir(GOLDEN_DIR / model), model)
    if problem:
        pytest.fail(problem, pytrace=False)


def test_no_orphan_golden_dirs(request: pytest.FixtureRequest) -> None:
    """Every directory of tests/golden belongs to a model of MODELS (update mode removes the others)."""
    orphans = sorted(p for p in GOLDEN_DIR.iterdir() if p.is_dir() and p.name not in MODELS) \
        if GOLDEN_DIR.is_dir() else []
    if orphans and update_requested(request.config):
        for p in orphans:
            shutil.rmtree(p)
        warnings.warn(GoldenUpdatedWarning(f"removed golden dirs of models no longer tested: "
                                           f"{', '.join(_shown(p) for p in orphans)}"))
        return
    if orphans:
        pytest.fail(f"golden dirs of models not in MODELS: {', '.join(_shown(p) for p in orphans)}\n{REGENERATE}",
                    pytrace=False)


def test_golden_files_have_no_addresses() -> None:
    hits = [f"{_shown(p)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group()!r}"
            for p in sorted(GOLDEN_DIR.glob("*/*.txt"))
            for text in [p.read_text(encoding="utf-8")]
            for m in [ADDRESS.search(text)] if m]
    assert not hits, "address-like text in golden files:\n" + "\n".join(hits)


def test_flow_dump_is_deterministic_in_process(tmp_path: Path) -> None:
    """Running the flow again in the same process (warm caches, counters) dumps the same text."""
    for model in ("resnet8", "shufflenet_like"):
        first = run_flow(model, tmp_path / model / "a")
        assert golden_mismatch(run_flow(model, tmp_path / model / "b"), first, model) is None


def test_comparison_catches_one_character_change_of_a_pass_output(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A formatter that prints one character differently for one node (layer-costs' column) is reported,
    naming the first pass whose dump shows it, with a one-line diff."""
    model, node_name = "resnet8", "conv1"
    baseline = run_flow(model, tmp_path / "baseline")

    original = printer._FORMATTERS[COST_KEY]
    monkeypatch.setitem(printer._FORMATTERS, COST_KEY, original)  # restored (same position) at teardown

    def off_by_one_char(node: torch.fx.Node) -> str:
        text = original(node)
        if node.name != node_name or not text:
            return text
        return text[:-1] + str((int(text[-1]) + 1) % 10)  # the last digit of macs=...

    duccio_fx.register_meta_formatter(COST_KEY, off_by_one_char)
    patched = run_flow(model, tmp_path / "patched")

    problem = golden_mismatch(patched, baseline, model)
    assert problem is not None
    costs_file = next(n for n in baseline if n.endswith("_layer-costs.txt"))
    assert f"first differing file: {costs_file}" in problem
    diff = problem.split(f"first differing file: {costs_file}\n", 1)[1].splitlines()
    removed = [ln for ln in diff if ln.startswith("-") and not ln.startswith("---")]
    added = [ln for ln in diff if ln.startswith("+") and not ln.startswith("+++")]
    assert len(removed) == len(added) == 1 and f"%{node_name} " in removed[0], problem
    old, new = removed[0][1:], added[0][1:]
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new)) == 1, problem
    # the files before layer-costs are unaffected; the change is visible in every dump that prints costs
    differing = problem.split("files whose text differs: ", 1)[1].split("\n", 1)[0].split(", ")
    assert differing[0] == costs_file
    assert all(n >= costs_file for n in differing) and len(differing) >= 2  # layer-costs and later dumps
    assert "--update-golden" in problem


def test_comparison_catches_a_missing_or_new_pass(tmp_path: Path) -> None:
    baseline = run_flow("lenet5", tmp_path)
    assert golden_mismatch(dict(baseline), baseline, "lenet5") is None
    without_last = dict(list(baseline.items())[:-1])
    problem = golden_mismatch(without_last, baseline, "lenet5")
    assert problem and "not dumped by the flow: " + list(baseline)[-1] in problem
    problem = golden_mismatch({**baseline, "006_new-pass.txt": "graph X:\n"}, baseline, "lenet5")
    assert problem and "not in the golden set: 006_new-pass.txt" in problem
