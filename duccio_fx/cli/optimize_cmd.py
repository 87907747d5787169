"""`duccio-fx optimize`: load the model file, run the recipe with live progress, write the results atomically."""

from __future__ import annotations

import io
import json
import pickle
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import typer
from rich.console import Console
from rich.markup import escape

from duccio_fx.cli.lower_cmd import lower_model, render_lowering
from duccio_fx.cli.model_file import load_model_file
from duccio_fx.cli.output import path_text, say
from duccio_fx.cli.optimize_view import LiveProgress, budget_notes, build_report, render_summary
from duccio_fx.cli.plots import plot_run, plots_available
from duccio_fx.cli.target_report import target_report
from duccio_fx.common.atomic import save_atomic, write_bytes_atomic, write_text_atomic
from duccio_fx.common.errors import DuccioError, ModelFileError
from duccio_fx.ir.pass_manager import Instrument, PassContext
from duccio_fx.lower.backend import lower
from duccio_fx.lower.dory import check_lowerable
from duccio_fx.search.constraints import Constraint
from duccio_fx.search.distributed import launched_world
from duccio_fx.search.recipe import Recipe
from duccio_fx.search.settings import SearchSettings
from duccio_fx.search.training import cross_entropy, top1
from duccio_fx.search.warmup_cache import default_cache_dir
from duccio_fx.targets import Target
from duccio_fx.targets.loader import target_record

VIOLATED_EXIT = 3  # 1: bad input (ours), 2: usage errors (typer/click)


def _loaders(ns: dict[str, Any], source: str) -> tuple[Any, Any]:
    out = []
    for name in ("train_loader", "val_loader"):
        fn = ns.get(name)
        if not callable(fn):
            raise ModelFileError(f"{source} defines no {name}()", where=source,
                                 fix=f"define `def {name}():` returning an iterable of (inputs, targets) batches, "
                                     "e.g. a torch DataLoader (see README: the model.py contract)")
        try:
            out.append(fn())
        except Exception as err:
            raise ModelFileError(f"{name}() raised {type(err).__name__}: {err}", where=source,
                                 fix=f"fix {name}() in {source}") from err
    return out[0], out[1]


def _check_out(out: Path, resume: bool) -> Path:
    """The checkpoint path, after refusing to overwrite a finished or interrupted run."""
    checkpoint = out / "checkpoint.pt"
    if resume:
        if not checkpoint.exists():
            raise DuccioError(f"nothing to resume: {checkpoint} does not exist", where="--resume",
                              fix="start without --resume, or point --out at the interrupted run's directory")
    elif (out / "report.json").exists():
        raise DuccioError(f"{out} already holds a finished run", where="--out",
                          fix="choose another --out directory (or delete this one)")
    elif checkpoint.exists():
        raise DuccioError(f"{out} holds an interrupted run", where="--out",
                          fix="pass --resume to continue it, or choose another --out directory")
    return checkpoint


def _remove_unfinished(out: Path, created: bool, checkpoint: Path) -> None:
    """A run directory this run created and that holds nothing finished (no checkpoint of a finished epoch,
    no report) is removed when the run fails."""
    if created and out.is_dir() and not checkpoint.exists() and not (out / "report.json").exists():
        shutil.rmtree(out, ignore_errors=True)


def interrupted_message(recipe: Recipe, out: Path, checkpoint: Path) -> str:
    """What Ctrl-C leaves behind, and the command that continues it."""
    done = recipe.history[-1] if recipe.history else None
    if done is None or not checkpoint.exists():
        return ("interrupted before the first epoch ended: nothing to resume. Run the same command again "
                "(without --resume).")
    program = Path(sys.argv[0]).name if sys.argv else ""
    if program in ("duccio-fx", "__main__.py") and "optimize" in sys.argv:
        args = [a for a in sys.argv[sys.argv.index("optimize"):] if a != "--resume"]
        if "--out" not in args:
            args += ["--out", str(out)]
        command = " ".join(shlex.quote(a) for a in ["duccio-fx", *args, "--resume"])
    else:  # called from Python (e.g. a test runner): the arguments are not in sys.argv
        command = f"the same duccio-fx optimize command with --out {shlex.quote(str(out))} --resume"
    return (f"interrupted: every finished epoch is saved in {checkpoint} (the last one: {done.phase} epoch "
            f"{done.epoch + 1}). Continue with:\n  {command}")


def _save_model(model: torch.nn.Module, path: Path) -> None:
    try:
        save_atomic(model, path)
    except (pickle.PicklingError, AttributeError, TypeError) as err:  # e.g. a class only the model file defines
        raise DuccioError(f"the exported model cannot be saved: {type(err).__name__}: {err}", where=str(path),
                          fix="export a torch.fx GraphModule or modules from an importable package (a search "
                              "method's export())") from err


def run_optimize(*, model: str, target: Target, constraints: Sequence[Constraint], settings: SearchSettings,
                 target_spec: str | Path | None = None,
                 out: Path | None, resume: bool, cache: Path | None, use_cache: bool,
                 instruments: Sequence[Instrument] = (), backends: Sequence[str] = ("onnx",),
                 dory: bool = False, calib_batches: int = 8, qat_epochs: int = 0,
                 console: Console | None = None, device: str = "auto", amp: str | None = None) -> int:
    """The whole command; returns its exit code (0 met, 3 violated). Bad input raises DuccioError.
    `target_spec` is the --target the user gave (a name or a TOML path), recorded in report.json so that
    `lower RUN` and `plot RUN` use the same target."""
    console = console or Console(width=max(Console().width, 140))
    if not launched_world().main:
        console = Console(file=io.StringIO())  # one rank of a torchrun launch: rank 0 speaks and writes
    if dory and calib_batches < 1:
        raise DuccioError(f"--calib-batches {calib_batches} must be at least 1", where="--calib-batches")
    if qat_epochs < 0 or (qat_epochs and not dory):
        raise DuccioError(f"--qat-epochs {qat_epochs}: give a count >= 0 together with --dory", where="--qat-epochs",
                          fix="add --dory (quantization-aware fine-tuning is part of the DORY lowering)")
    torch.manual_seed(settings.seed)  # the model file may build its weights and data from the global RNG
    spec = load_model_file(model)
    out = out or Path("runs") / Path(spec.source.removeprefix("zoo:")).stem
    if resume and (out / "report.json").exists():  # finished: nothing to continue, nothing to train again
        status = json.loads((out / "report.json").read_text()).get("status")
        say(console, f"{path_text(out)} holds a finished run (status: {status}): nothing to resume; its results are "
                     f"in {path_text(out / 'report.json')}")
        return 0 if status == "met" else VIOLATED_EXIT
    if dory:  # an op DORY cannot run is refused now, not after the search
        check_lowerable(spec.model, spec.example_inputs[0], target, spec.leaf_modules)
    checkpoint = _check_out(out, resume)
    train, val = _loaders(spec.namespace, spec.source)
    loss_fn = spec.namespace.get("loss_fn") or cross_entropy
    metric_fn = spec.namespace.get("metric_fn") or top1
    live = LiveProgress(console, settings)
    context = PassContext(instruments)
    recipe = Recipe(spec.model, spec.example_inputs, train, val, constraints, target, settings, loss_fn=loss_fn,
                    metric_fn=metric_fn, leaf_modules=spec.leaf_modules, checkpoint=checkpoint,
                    cache_dir=(cache or default_cache_dir()) if use_cache else None, progress=live,
                    context=context, device=device, amp=amp)
    console.print(f"device: {recipe.device}" + (f", autocast {amp}" if recipe.amp else ""), highlight=False)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # only now: bad input (e.g. an infeasible bound) leaves nothing behind
    try:
        for note in recipe.notes:
            say(console, f"note: {escape(note)}")
        for c in recipe.constraints:
            m = c.constraint.measure
            console.print(f"constraint: {c.describe()} (seed {m.describe(float(c.value(recipe.seed_costs)))}, "
                          f"smallest possible {m.describe(recipe.minima[c.label])})", highlight=False)
        with live.progress:
            result = recipe.run(resume=resume)
    except KeyboardInterrupt:
        _remove_unfinished(out, created, checkpoint)
        say(console, escape(interrupted_message(recipe, out, checkpoint)))
        raise typer.Exit(130) from None
    except BaseException as err:  # e.g. a bad label in batch 3: no half-written run directory stays behind
        _remove_unfinished(out, created, checkpoint)
        if isinstance(err, DuccioError) and checkpoint.exists() and recipe.world.main:
            err.fix = (f"{err.fix}; " if err.fix else "") + (
                f"the finished epochs are saved in {checkpoint}: after fixing, continue with --resume")
            err.args = (err.render(),)
        raise
    if not recipe.world.main:
        return 0 if result.met else VIOLATED_EXIT
    result.model.cpu()  # model.pt loads anywhere; the backends (ONNX, DORY's integer network) work on the CPU

    seed_rep = target_report(result.searchable.seed_terms, target)
    final_rep = target_report(result.final_terms, target)
    checks: dict[str, float] = {}
    bundle = None
    if result.met:  # every backend runs and checks before any file is written
        lowered = [lower(name, result.model, spec.example_inputs, target, context) for name in backends]
        if dory:
            bundle, _ = lower_model(result.model, spec, target, calib_batches=calib_batches, percentile=99.99,
                                    context=context, console=console, qat_epochs=qat_epochs)
        _save_model(result.model, out / "model.pt")
        files = {"model": str(out / "model.pt")}
        for name, low in zip(backends, lowered):
            for file, data in low.files.items():
                write_bytes_atomic(out / file, data)
                files[name if len(low.files) == 1 else f"{name}:{file}"] = str(out / file)
            checks.update(low.checks)
        if bundle is not None:
            bundle.report["source"] = f"{out} (the result of {spec.source})"
            bundle.save(out / "dory")
            files["dory"] = str(out / "dory")
            checks["dory_twin_max_abs_diff"] = bundle.report["checks"]["twin_max_abs_diff"]
    else:
        files = {"violating_model": str(out / "model-violating.pt")}
        _save_model(result.model, out / "model-violating.pt")
    files.update(report=str(out / "report.json"), summary=str(out / "summary.txt"))
    report = build_report(result, spec.source, target, seed_rep, final_rep, checks, files,
                          target_spec=target_record(target_spec if target_spec is not None else target))
    report["notes"] = budget_notes(report, settings)
    if bundle is not None:
        report["dory"] = {"dir": str(out / "dory"), "accuracy": bundle.report.get("accuracy"),
                          "layers": len(bundle.net.layers), "bnrelu_bits": bundle.report["bnrelu_bits"]}
    text_console = Console(record=True, width=120, file=io.StringIO())
    render_summary(report, text_console)
    if bundle is not None:
        render_lowering(bundle, out / "dory", text_console)
    write_text_atomic(out / "summary.txt", text_console.export_text())
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))  # last: marks the run finished
    checkpoint.unlink(missing_ok=True)
    render_summary(report, console)
    for note in report["notes"]:
        say(console, f"[yellow]note:[/] {escape(note)}")
    if plots_available():  # the pictures are a bonus: a plotting problem must not cost the run
        try:
            say(console, f"plots: {', '.join(path_text(path) for path in plot_run(out))}")
        except Exception as err:  # noqa: BLE001 (any matplotlib failure)
            console.print(f"[yellow]note:[/] no plots ({type(err).__name__}: {err})", highlight=False)
    if bundle is not None:
        render_lowering(bundle, out / "dory", console)
    elif dory:
        console.print("[yellow]note:[/] --dory: nothing lowered, the search did not meet its constraints",
                      highlight=False)
    if not result.met:
        say(console, f"[bold red]error:[/] the search ended with a violated constraint; the model is in "
                     f"{path_text(out / 'model-violating.pt')} and is NOT a valid result")
        return VIOLATED_EXIT
    return 0
