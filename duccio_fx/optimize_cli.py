"""`duccio-fx optimize`: load the model file, run the recipe with live progress, write the results atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from duccio_fx.atomic import save_atomic, write_bytes_atomic, write_text_atomic
from duccio_fx.constraints import Constraint
from duccio_fx.errors import DuccioError, ModelFileError
from duccio_fx.search import EpochRecord, Recipe, SearchSettings, cross_entropy, default_cache_dir, top1

OPTIONS = {"size": "--max-size", "params": "--max-params", "macs": "--max-ops", "latency": "--max-latency"}
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


def _prepare_out(out: Path, resume: bool) -> Path:
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
    out.mkdir(parents=True, exist_ok=True)
    return checkpoint


def _fmt(value: float, metric: str) -> str:
    return f"{value * 1e3:.3f}ms" if metric == "latency" else f"{value:,.0f}"


class _Live:
    """Rich progress: one bar per phase, one line per epoch with loss, metric and each constraint."""

    def __init__(self, console: Console, settings: SearchSettings) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self.totals = {"warmup": settings.warmup_epochs, "search": settings.search_epochs,
                       "finetune": settings.finetune_epochs}
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "cached":
            self.console.print(f"warmup: reused from the cache ({data['path']})", highlight=False)
            return
        phase = data.get("phase") or data["record"].phase
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=self.totals[phase], info="")
        task = self.tasks[phase]
        if event == "step":
            self.progress.update(task, info=f"epoch {data['epoch'] + 1} step {data['step'] + 1}"
                                            f"{'/' + str(data['steps']) if data['steps'] else ''} loss {data['loss']:.4f}")
            return
        rec: EpochRecord = data["record"]
        parts = [f"{phase} {rec.epoch + 1}", f"loss {rec.train_loss:.4f}", f"val loss {rec.val_loss:.4f}",
                 f"val metric {rec.val_metric:.4f}"]
        for c, bound, (label, value) in zip(data["constraints"], data["bounds"], rec.costs.items()):
            ok = value <= bound * (1 + 1e-12)
            parts.append(f"{label} {_fmt(value, c.metric)}/{_fmt(bound, c.metric)} "
                         f"{'[green]ok[/]' if ok else '[red]over[/]'}")
        self.progress.update(task, completed=min(rec.epoch + 1, self.totals[phase]), total=max(
            self.totals[phase], rec.epoch + 1))
        self.console.print(" | ".join(parts))


def run_optimize(*, model: str, target: str, bounds: dict[str, str | None], layerwise: float | None, method: str,
                 epochs: tuple[int, int, int], max_search_epochs: int | None, form: str,
                 constant_lambda: float | None, lr: float, arch_lr: float | None, out: Path | None, resume: bool,
                 seed: int, cache: Path | None, use_cache: bool, console: Console | None = None) -> int:
    from duccio_fx.model_file import load_model_file
    from duccio_fx.objective import FORMS
    from duccio_fx.onnx_export import to_onnx
    from duccio_fx.optimize_report import build_report, render_summary
    from duccio_fx.pipeline import analyze
    from duccio_fx.target_report import target_report
    from duccio_fx.targets import load_target

    console = console or Console(width=max(Console().width, 140))
    if method != "mask":
        raise DuccioError(f"unknown search method {method!r}", where="--method",
                          fix="use --method mask (the path-based supernet is not available yet)")
    if form not in FORMS:
        raise DuccioError(f"unknown penalty form {form!r}", where="--form", fix=f"use one of: {', '.join(FORMS)}")
    for name, value in (("--lr", lr), ("--arch-lr", arch_lr), ("--constant-lambda", constant_lambda)):
        if value is not None and not value > 0:
            raise DuccioError(f"{name} must be > 0, got {value}", where=name)
    if max_search_epochs is not None and max_search_epochs < epochs[1]:
        raise DuccioError(f"--max-search-epochs {max_search_epochs} is below the minimum search epochs "
                          f"{epochs[1]}", where="--max-search-epochs", fix="raise it, or lower S in --epochs W,S,F")
    if layerwise is not None and layerwise <= 0:
        raise DuccioError(f"--layerwise {layerwise} must be a positive slack", where="--layerwise",
                          fix="e.g. --layerwise 0.3 (layers that overflow a level by at most 30 %)")
    hw = load_target(target)
    constraints = [Constraint.parse(metric, text, option=OPTIONS[metric]) for metric, text in bounds.items() if text]
    w, s, f = epochs
    settings = SearchSettings(warmup_epochs=w, search_epochs=s, finetune_epochs=f, max_search_epochs=max_search_epochs,
                              lr=lr, arch_lr=arch_lr, form=form, schedule="ramp" if constant_lambda is None else "constant",
                              constant_lambda=constant_lambda or 1.0, seed=seed, layerwise=layerwise)
    torch.manual_seed(seed)  # the model file may build its weights and data from the global RNG
    spec = load_model_file(model)
    out = out or Path("runs") / Path(spec.source.removeprefix("zoo:")).stem
    checkpoint = _prepare_out(out, resume)
    train, val = _loaders(spec.namespace, spec.source)
    loss_fn = spec.namespace.get("loss_fn") or cross_entropy
    metric_fn = spec.namespace.get("metric_fn") or top1
    live = _Live(console, settings)
    recipe = Recipe(spec.model, spec.example_inputs, train, val, constraints, hw, settings, loss_fn=loss_fn,
                    metric_fn=metric_fn, leaf_modules=spec.leaf_modules, checkpoint=checkpoint,
                    cache_dir=(cache or default_cache_dir()) if use_cache else None, progress=live)
    for c, bound in zip(recipe.constraints, recipe.bounds):
        console.print(f"constraint: {c.describe(bound)} (seed {float(c.value(recipe.seed_costs)):,.6g}, "
                      f"smallest possible {recipe.minima[c.label]:,.6g})", highlight=False)
    with live.progress:
        result = recipe.run(resume=resume)

    example = tuple(x[:1] for x in spec.example_inputs)
    seed_rep = target_report(analyze(spec.model, example, spec.leaf_modules), hw)
    final_rep = target_report(analyze(result.model, example), hw)
    files: dict[str, str] = {}
    onnx_diff = None
    if result.met:
        onnx_bytes, onnx_diff = to_onnx(result.model, example)
        files = {"model": str(out / "model.pt"), "onnx": str(out / "model.onnx"), "report": str(out / "report.json"),
                 "summary": str(out / "summary.txt")}
        save_atomic(result.model, out / "model.pt")
        write_bytes_atomic(out / "model.onnx", onnx_bytes)
    else:
        files = {"violating_model": str(out / "model-violating.pt"), "report": str(out / "report.json"),
                 "summary": str(out / "summary.txt")}
        save_atomic(result.model, out / "model-violating.pt")
    report = build_report(result, spec.source, hw, seed_rep, final_rep, onnx_diff, files)
    text_console = Console(record=True, width=120, file=io.StringIO())
    render_summary(report, text_console)
    write_text_atomic(out / "summary.txt", text_console.export_text())
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))  # last: marks the run finished
    checkpoint.unlink(missing_ok=True)
    render_summary(report, console)
    if not result.met:
        console.print(f"[bold red]error:[/] the search ended with a violated constraint; the model is in "
                      f"{out / 'model-violating.pt'} and is NOT a valid result", highlight=False)
        return VIOLATED_EXIT
    return 0
