"""`duccio-fx lower` and `optimize --dory`: lower a model (a finished run's result or any model file) to the
directory DORY generates GAP8 code from, with the integer accuracy the executor measures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from duccio_fx.cli.model_file import ModelSpec, load_model_file
from duccio_fx.cli.output import path_text, say
from duccio_fx.cli.plots import report_target
from duccio_fx.common.errors import DuccioError, ModelFileError
from duccio_fx.ir.pass_manager import Instrument, PassContext
from duccio_fx.lower.dory import DoryBundle, lower_to_dory
from duccio_fx.search.training import call_model, cross_entropy, split_batch
from duccio_fx.targets import Target, load_target

RANDOM_CALIBRATION_BATCHES = 4
QAT_LR = 1e-4  # Adam: a small step, the weights are already trained


def _loader(spec: ModelSpec, name: str) -> Iterable[Any] | None:
    fn = spec.namespace.get(name)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception as err:
        raise ModelFileError(f"{name}() raised {type(err).__name__}: {err}", where=spec.source,
                             fix=f"fix {name}() in {spec.source}") from err


def load_source(source: str) -> tuple[torch.nn.Module, ModelSpec, str, dict[str, Any] | None]:
    """The model to lower, its model file, a description and, for a finished optimize run directory, its
    report (a run directory, a model file or zoo:NAME)."""
    path = Path(source)
    if path.is_dir():
        report_file, model_file = path / "report.json", path / "model.pt"
        if not report_file.exists() or not model_file.exists():
            raise DuccioError(f"{path} is not a finished optimize run (no report.json and model.pt)", where=str(path),
                              fix="give a run directory whose search met its constraints, or a model file")
        report = json.loads(report_file.read_text())
        model_source = report.get("source", "")
        spec = load_model_file(model_source)
        model = torch.load(model_file, weights_only=False)
        return model, spec, f"{path} (the result of {model_source})", report
    spec = load_model_file(source)
    return spec.model, spec, spec.source, None


def _fine_tune(train: Iterable[Any], loss_fn: Any, epochs: int, console: Console) -> Callable[[nn.Module], None]:
    """K epochs of Adam on the fake-quantized graph (quantization-aware fine-tuning)."""
    def fine_tune(model: nn.Module) -> None:
        optimizer = torch.optim.Adam(model.parameters(), QAT_LR)
        device = next(model.parameters()).device
        for epoch in range(epochs):
            total = count = 0.0
            for batch in train:
                x, y = split_batch(batch)
                loss = loss_fn(call_model(model, x.to(device)), y.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()) * len(y), count + len(y)
            console.print(f"quantization-aware fine-tuning, epoch {epoch + 1}/{epochs}: loss "
                          f"{total / max(count, 1):.4f}", highlight=False)
    return fine_tune


def lower_model(model: torch.nn.Module, spec: ModelSpec, target: Target, *, calib_batches: int, percentile: float,
                context: PassContext, console: Console, qat_epochs: int = 0) -> tuple[DoryBundle, str]:
    """Calibrate on the model file's train_loader() (random inputs when it has none), optionally fine-tune
    under fake quantization for `qat_epochs`, lower, and measure the float and integer accuracy on
    val_loader() when there is one."""
    train = _loader(spec, "train_loader")
    if qat_epochs and train is None:
        raise DuccioError("--qat-epochs needs training data, and the model file has no train_loader()",
                          where=spec.source, fix="define train_loader() in the model file, or drop --qat-epochs")
    calibration = "train_loader()"
    if train is None:
        generator = torch.Generator().manual_seed(0)
        example = spec.example_inputs[0]
        train = [torch.randn((8, *example.shape[1:]), generator=generator) for _ in range(RANDOM_CALIBRATION_BATCHES)]
        calibration = "random normal inputs (the model file has no train_loader())"
        console.print(f"[yellow]note:[/] calibrating on {calibration}; the scales are only as good as that",
                      highlight=False)
    fine_tune = _fine_tune(train, spec.namespace.get("loss_fn") or cross_entropy, qat_epochs, console) \
        if qat_epochs else None
    bundle = lower_to_dory(model, train, target, calib_batches=calib_batches, percentile=percentile, context=context,
                           leaf_modules=spec.leaf_modules, fine_tune=fine_tune)
    bundle.report["calibration"]["data"] = calibration
    bundle.report["qat_epochs"] = qat_epochs
    val = _loader(spec, "val_loader")
    if val is not None:
        bundle.evaluate(val)
    return bundle, calibration


def render_lowering(bundle: DoryBundle, out: Path | None, console: Console) -> None:
    report = bundle.report
    table = Table(title=f"DORY layers for {report['platform'] or report['target']} (BNRelu_bits "
                        f"{report['bnrelu_bits']})")
    for col, justify in (("#", "right"), ("layer", "left"), ("from", "left"), ("out (C,H,W)", "left"),
                         ("type", "left"), ("shift", "right"), ("bytes", "right"), ("level", "left"),
                         ("cycles", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in report["layers"]:
        table.add_row(str(row["index"]), row["kind"], row["source"], "x".join(map(str, row["out_shape_chw"])),
                      row["out_type"], "" if row["requant_shift"] is None else str(row["requant_shift"]),
                      f"{row['bytes']:,.0f}", row["level"], "" if row["cycles"] is None else f"{row['cycles']:,.0f}")
    console.print(table)
    acc = report.get("accuracy")
    if acc:
        console.print(f"accuracy on {acc['samples']} validation samples: float {acc['float_accuracy']:.2%}, "
                      f"integer {acc['integer_accuracy']:.2%} (drop {acc['drop'] * 100:+.2f} points; the integer "
                      f"network picks the float model's class on {acc['argmax_agreement']:.2%})", highlight=False)
    checks = report["checks"]
    console.print(f"checks: onnxruntime on the standard-ops twin == integer executor on every value of every layer "
                  f"(max diff {checks['twin_max_abs_diff']:.0f}, {checks.get('checked_inputs', 1):.0f} inputs); "
                  "the Quantlab ONNX reads back to the same network", highlight=False)
    if out is not None:
        say(console, f"wrote {path_text(out)}/: network.onnx, config.json, input.txt, "
                     f"out_layer0..{len(report['layers']) - 1}.txt, network_twin.onnx, lowering.json")


def run_lower(*, source: str, target: Target | None, out: Path, calib_batches: int, percentile: float,
              qat_epochs: int = 0, instruments: Sequence[Instrument] = (), as_json: bool = False,
              console: Console | None = None, device: torch.device | None = None, force: bool = False) -> int:
    """`duccio-fx lower`. `target` None: the run's own target (recorded in its report.json), else gap8. An
    `out` that exists and is not empty is refused unless `force` (then the lowering's files replace those
    there)."""
    console = console or Console(width=max(Console().width, 140), stderr=as_json)
    if calib_batches < 1:
        raise DuccioError(f"--calib-batches {calib_batches} must be at least 1", where="--calib-batches")
    if not 0 < percentile <= 100:
        raise DuccioError(f"--percentile {percentile} must be in (0, 100]", where="--percentile",
                          fix="e.g. 99.99 (100 is the plain maximum)")
    if qat_epochs < 0:
        raise DuccioError(f"--qat-epochs {qat_epochs} must be 0 or more", where="--qat-epochs")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise DuccioError(f"{out} already exists" + (" and is not empty" if out.is_dir() else " (a file)"),
                          where="--out", fix="choose another --out directory, or pass --force to replace the "
                                             "lowering's files in it")
    model, spec, described, report = load_source(source)
    if report is None:
        weights = ("random: the zoo has no trained weights" if source.startswith("zoo:") else
                   "as the model file builds them: untrained, unless the file loads trained weights")
        say(console, f"[yellow]note:[/] {escape(source)} is not a finished run; its weights are {weights}, so the "
                     "accuracy below says nothing about a trained network. To deploy a search result, lower its run "
                     "directory (duccio-fx lower RUN_DIR).")
    if target is None:
        try:
            target = report_target(report, strict=True) if report is not None else None
        except DuccioError as err:
            raise DuccioError(f"the target this run was searched on ({report.get('target')!r}) cannot be loaded: "
                              f"{err.what}", where=f"{source}/report.json",  # type: ignore[union-attr]
                              fix="pass --target NAME_OR_TOML_PATH") from None
        if target is not None:
            recorded = report.get("target_spec") or {}  # type: ignore[union-attr]
            origin = f", {path_text(recorded['path'])}" if recorded.get("path") else ""
            say(console, f"target: {escape(target.name)} (the run's own{origin}, as its report.json records it)")
        else:
            target = load_target("gap8")
    if device is not None:
        model.to(device)  # calibration and QAT run there; batches follow the model's parameters
    bundle, _ = lower_model(model, spec, target, calib_batches=calib_batches, percentile=percentile,
                            context=PassContext(instruments), console=console, qat_epochs=qat_epochs)
    bundle.report["source"] = described
    bundle.report["weights"] = "trained (a finished optimize run)" if report is not None else (
        "random (a zoo model)" if source.startswith("zoo:") else "as the model file builds them")
    bundle.save(out)
    written = set(bundle.all_files())
    for stale in out.glob("out_layer*.txt"):  # --force over a lowering with more layers
        if stale.name not in written:
            stale.unlink()
    if as_json:
        print(json.dumps(bundle.report, indent=2))
    else:
        render_lowering(bundle, out, console)
    return 0
