"""The `duccio-fx` command line: parses options, calls the layers below, renders their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version as _package_version
from pathlib import Path
from typing import Any, Optional

import typer
from torch import __version__ as torch_version
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from duccio_fx import zoo as z
from duccio_fx.cli.inspect_view import inspect_report, render_inspect, render_precisions, render_widths
from duccio_fx.cli.lower_cmd import run_lower
from duccio_fx.cli.model_file import load_model_file
from duccio_fx.cli.optimize_cmd import run_optimize
from duccio_fx.cli.output import path_text, say
from duccio_fx.cli.path_view import path_report, render_path_report
from duccio_fx.cli.plots import plot_path, plot_sweep, plots_available
from duccio_fx.cli.sweep_cmd import SweepSpec, build_grid, ray_executor, run_sweep
from duccio_fx.cli.target_report import render_target_report, target_report
from duccio_fx.cli.target_view import render_target
from duccio_fx.common.device import resolve_amp, resolve_device
from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.pass_manager import DumpIR, Instrument, PassContext, PrintIR, TimePasses
from duccio_fx.lower.backend import backends
from duccio_fx.pipeline import analyze
from duccio_fx.search.constraints import Constraint
from duccio_fx.search.mask_method import check_channel_multiple
from duccio_fx.search.objective import FORMS
from duccio_fx.search.path_method import PATH_DEFAULTS, PATH_METHODS
from duccio_fx.search.precision import WidthRules
from duccio_fx.search.settings import SearchSettings
from duccio_fx.search.space import make_searchable, search_methods
from duccio_fx.targets import list_targets, load_target, load_target_file

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Hardware-aware neural architecture search (DUCCIO) for tiny devices, on torch.fx.")
err_console = Console(stderr=True, soft_wrap=True)  # errors stay on one line: easy to grep and copy


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"duccio-fx {_package_version('duccio-fx')} (torch {torch_version})")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """duccio-fx: inspect a model's graph, channels and costs; search it under hardware constraints."""


def _fail(err: DuccioError) -> typer.Exit:
    # escape: messages quote shapes and TOML tables in brackets, which rich would take for markup
    err_console.print(f"[bold red]error:[/] {escape(err.what)}", highlight=False)
    if err.where:
        err_console.print(f"  [bold]where:[/] {escape(err.where)}", highlight=False)
    if err.fix:
        err_console.print(f"  [bold]how to fix:[/] {escape(err.fix)}", highlight=False)
    return typer.Exit(1)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model file (see README: the model.py contract) or zoo:NAME"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report on stdout instead of tables"),
    print_between_passes: bool = typer.Option(False, "--print-between-passes",
                                              help="print the IR before the first pass and after every pass"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after each pass to DIR/NNN_<pass>.txt"),
    target: Optional[str] = typer.Option(None, "--target", help="a target name (`duccio-fx targets list`) or "
                                         "TOML path: adds per-layer memory, level, cycles, critical layers"),
    layerwise: str = typer.Option("0.3,0.6,0.9", "--layerwise", help="slack values C for critical layers, "
                                  "comma-separated (with --target)"),
    method: str = typer.Option("mask", "--method", help="mask: channel groups; path: also list the choice points "
                               "with their alternatives and costs, and the layers kept fixed"),
    alternatives: Optional[list[str]] = typer.Option(None, "--alternatives", help="with --method path: as for "
                                                     "optimize"),
    channel_multiple: int = typer.Option(1, "--channel-multiple", help="mask method: show how blocks of N "
                                         "channels cut every group, and which groups cannot keep a multiple of N"),
    bits: Optional[str] = typer.Option(None, "--bits", help="mask method: the weight widths each layer may take "
                                       "with optimize --bits (e.g. 2,4,8), and why a layer keeps the target's"),
) -> None:
    """Show every layer of MODEL with its shapes and costs, and its channel groups with frozen reasons."""
    timer = TimePasses()
    instruments = [timer, *_ir_instruments(print_between_passes, dump_ir, sys.stderr if as_json else sys.stdout)]
    try:
        hw = load_target(target) if target is not None else None
        slacks = _slacks(layerwise)
        spec = load_model_file(model)
        # with --method path the IR instruments follow the path method's own flow (analysis, supernet-insertion)
        gm = analyze(spec.model, spec.example_inputs, spec.leaf_modules,
                     [timer] if method in PATH_METHODS else instruments)
        report = inspect_report(gm, spec.source, timer.seconds)
        if hw is not None:
            report["target"] = target_report(gm, hw, slacks)
        if method not in search_methods():
            raise DuccioError(f"unknown search method {method!r}", where="--method",
                              fix=f"use one of: {', '.join(search_methods())}")
        if alternatives and method not in PATH_METHODS:
            raise DuccioError("--alternatives belongs to the path methods", where="--alternatives",
                              fix="add --method path (or path+mask)")
        mask_options = _mask_options(method, channel_multiple)
        mask_options.update(_bits_options(method, bits, False, 5.0, 0.8))  # (one --bits: plain widths)
        if method in PATH_METHODS:
            space = make_searchable(spec.model, spec.example_inputs, method, leaf_modules=spec.leaf_modules,
                                    context=PassContext(instruments[1:]), alternatives=alternatives)
            report["path"] = path_report(space, hw)  # type: ignore[arg-type]
        elif mask_options:
            space = make_searchable(spec.model, spec.example_inputs, "mask", leaf_modules=spec.leaf_modules,
                                    **mask_options)
            report["channel_multiple"] = channel_multiple
            report["widths"] = space.width_report()  # type: ignore[attr-defined]
            if bits is not None:
                report["weight_bits"] = space.precision_report()  # type: ignore[attr-defined]
                if hw is not None:
                    report["target"]["smallest_size_bytes"] = space.minimum_costs(hw).size_bytes
    except DuccioError as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        console = Console(width=max(Console().width, 160))
        render_inspect(report, console)
        if hw is not None:
            render_target_report(report["target"], console)
        if "path" in report:
            render_path_report(report["path"], console)
        if "widths" in report and report["channel_multiple"] > 1:
            render_widths(report["widths"], report["channel_multiple"], console)
        if "weight_bits" in report:
            render_precisions(report["weight_bits"], console, chosen=False)
            if hw is not None:
                console.print(f"smallest size with --bits {bits}: {report['target']['smallest_size_bytes']:,.0f} B "
                              f"(every searched layer at its narrowest width, one channel per group)",
                              highlight=False)


def _ir_instruments(print_between_passes: bool, dump_ir: Path | None, stream: Any) -> list[Instrument]:
    """The instruments of --print-between-passes and --dump-ir."""
    instruments: list[Instrument] = []
    if print_between_passes:
        instruments.append(PrintIR(stream))
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    return instruments


def _slacks(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        values = ()
    if not values or any(v <= 0 for v in values):
        raise DuccioError(f"--layerwise {text!r} is not a list of positive numbers", where="--layerwise",
                          fix="write slack values such as 0.3 or 0.3,0.6,0.9")
    return values


def _epochs(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[1] < 1:
        raise DuccioError(f"--epochs {text!r} must be three whole numbers W,S,F (warmup, minimum search, "
                          "fine-tune), S >= 1", where="--epochs", fix="e.g. --epochs 5,10,5")
    return parts  # type: ignore[return-value]


@app.command()
def optimize(
    model: str = typer.Argument(..., help="model file with train_loader()/val_loader() (see README)"),
    target: str = typer.Option("gap8", "--target", help="target name or TOML path"),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="bytes at the target's bit widths: 64kB, 50%"),
    max_params: Optional[str] = typer.Option(None, "--max-params", help="conv/linear parameters: 30k, 50%"),
    max_ops: Optional[str] = typer.Option(None, "--max-ops", help="MACs per sample: 2M, 50%"),
    max_latency: Optional[str] = typer.Option(None, "--max-latency", help="target latency model: 5ms, 80%"),
    layerwise: Optional[float] = typer.Option(None, "--layerwise", help="slack C: critical layers must fit "
                                              "their memory level (e.g. 0.3)"),
    method: str = typer.Option("mask", "--method", help="search method (`duccio-fx methods` lists them)"),
    epochs: str = typer.Option("5,10,5", "--epochs", help="W,S,F: warmup, minimum search, fine-tune epochs"),
    max_search_epochs: Optional[int] = typer.Option(None, "--max-search-epochs",
                                                    help="stop searching here even if a constraint is violated "
                                                         "(default 2 x S)"),
    form: str = typer.Option("max", "--form", help="penalty: max (DUCCIO), abs, objective (classical DNAS)"),
    constant_lambda: Optional[float] = typer.Option(None, "--constant-lambda",
                                                    help="use this λ throughout instead of the ramp (ablations)"),
    lr: float = typer.Option(1e-3, "--lr", help="weights learning rate (Adam)"),
    arch_lr: Optional[float] = typer.Option(None, "--arch-lr", help="mask (α) learning rate (Adam, no weight "
                                            "decay); default: auto from the number of search steps"),
    out: Optional[Path] = typer.Option(None, "--out", help="output directory (default runs/<model name>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the interrupted run in --out"),
    seed: int = typer.Option(0, "--seed", help="random seed (runs with the same seed repeat exactly)"),
    cache: Optional[Path] = typer.Option(None, "--cache", help="warmup cache directory "
                                         "(default $DUCCIO_FX_CACHE or ~/.cache/duccio-fx)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="do not reuse or store the warmup"),
    print_between_passes: bool = typer.Option(False, "--print-between-passes",
                                              help="print the IR before the first pass and after every pass of the "
                                                   "flow (analysis, mask insertion, export, analysis of the result)"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after each pass of the flow to "
                                           "DIR/NNN_<pass>.txt"),
    backend: list[str] = typer.Option(["onnx"], "--backend", help="deployment files to write (repeatable; "
                                      "`duccio-fx methods` lists methods and backends)"),
    dory: bool = typer.Option(False, "--dory", help="also lower the result to DORY's 8-bit inputs in OUT/dory/ "
                              "(see `duccio-fx lower`)"),
    calib_batches: int = typer.Option(8, "--calib-batches", help="with --dory: training batches for calibration"),
    qat_epochs: int = typer.Option(0, "--qat-epochs", help="with --dory: epochs of quantization-aware fine-tuning"),
    alternatives: Optional[list[str]] = typer.Option(None, "--alternatives", help="--method path: alternatives "
                                                     "of every block, e.g. conv3,conv5,dwsep3,identity (default), "
                                                     "and per layer PATTERN=NAMES, e.g. 'stack3.*=conv3,identity' "
                                                     "or 'conv1=none' (repeatable; the last match wins)"),
    estimator: str = typer.Option("all", "--estimator", help="--method path: all (every alternative runs each "
                                  "step, the paper's) or sampled (only the sampled one runs)"),
    path_costs: Optional[str] = typer.Option(None, "--path-costs", help="--method path/path+mask: costs of the "
                                             "sampled one-hot choice (sampled, paper eq. 8), of the softmax "
                                             "probabilities (expected; path+mask's default), of the "
                                             "architecture held, every point's argmax (argmax), or that one's "
                                             "penalty with a gradient from every architecture one point away "
                                             "(neighbours; path's default, path only)"),
    temperature: float = typer.Option(5.0, "--temperature", help="--method path: Gumbel-softmax temperature at "
                                      "the first search epoch"),
    temperature_decay: float = typer.Option(0.8, "--temperature-decay", help="--method path: the temperature "
                                            "multiplies by this every search epoch (1: constant)"),
    seed_logit: Optional[float] = typer.Option(None, "--seed-logit", help="--method path/path+mask: θ of each "
                                               "point's seed alternative when the search starts, the others 0 "
                                               "(default 2; the paper's: 0)"),
    argmax_share: Optional[float] = typer.Option(None, "--argmax-share", help="--method path/path+mask: share "
                                                 "of the search's steps that train the architecture it holds now "
                                                 "(every point's argmax alternative) instead of a sampled one "
                                                 "(path's default: 0.5, path+mask's: 0)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when torch sees a GPU, else the CPU), cpu, "
                               "cuda, cuda:N or mps"),
    amp: Optional[str] = typer.Option(None, "--amp", help="autocast the model's forward pass: bf16 or fp16 "
                                      "(fp16 on CUDA only); costs stay in float64"),
    nproc: int = typer.Option(1, "--nproc", help="data-parallel processes on this machine (torch.distributed: "
                              "gloo on CPUs, NCCL with one GPU each); the loaders' batch size is per process"),
    channel_multiple: int = typer.Option(1, "--channel-multiple", help="--method mask: keep a multiple of N "
                                         "channels in every searched group (masks of blocks of N channels), e.g. "
                                         "4 for PULP-NN's channel blocking, 8 or 16 for GAP9's NE16"),
    bits: Optional[list[str]] = typer.Option(None, "--bits", help="--method mask: also search every layer's weight "
                                             "precision among these widths, e.g. 2,4,8 (mixed precision; the head "
                                             "stays at the target's width), and per layer PATTERN=WIDTHS, e.g. "
                                             "'stage3.*=4,8' (repeatable; the last match wins)"),
    act_bits: Optional[list[str]] = typer.Option(None, "--act-bits", help="--method mask: also search every "
                                                 "layer's output (activation) precision among these widths, e.g. "
                                                 "2,4,8 (PACT quantizers with a learned range); PATTERN=WIDTHS "
                                                 "rules as for --bits"),
    bits_only: bool = typer.Option(False, "--bits-only", help="with --bits/--act-bits: search the precisions "
                                   "alone (every channel kept)"),
) -> None:
    """Search MODEL under every constraint in one run (warmup, search, export, fine-tune) and write the result.

    Exit 0 when every constraint is met; 3 when the search ended with a violation (the report says by how
    much); 1 on bad input (2 on a malformed command line).
    """
    try:
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            raise typer.Exit(_launch(nproc))
        if method not in search_methods():
            raise DuccioError(f"unknown search method {method!r}", where="--method",
                              fix=f"use one of: {', '.join(search_methods())}")
        for name in backend:
            if name not in backends():
                raise DuccioError(f"unknown backend {name!r}", where="--backend", fix=f"use one of: {', '.join(backends())}")
        if form not in FORMS:
            raise DuccioError(f"unknown penalty form {form!r}", where="--form", fix=f"use one of: {', '.join(FORMS)}")
        for name, value in (("--lr", lr), ("--arch-lr", arch_lr), ("--constant-lambda", constant_lambda)):
            if value is not None and not value > 0:
                raise DuccioError(f"{name} must be > 0, got {value}", where=name)
        resolve_amp(amp, resolve_device(device))  # a device this machine lacks is refused before any loading
        method_options = _path_options(method, alternatives, estimator, path_costs, temperature, temperature_decay,
                                       bool(bits) or bool(act_bits), seed_logit, argmax_share)
        method_options.update(_mask_options(method, channel_multiple))
        method_options.update(_bits_options(method, bits, bits_only, temperature, temperature_decay, act_bits))
        w, s, f = _epochs(epochs)
        if max_search_epochs is not None and max_search_epochs < s:
            raise DuccioError(f"--max-search-epochs {max_search_epochs} is below the minimum search epochs {s}",
                              where="--max-search-epochs", fix="raise it, or lower S in --epochs W,S,F")
        if layerwise is not None and layerwise <= 0:
            raise DuccioError(f"--layerwise {layerwise} must be a positive slack", where="--layerwise",
                              fix="e.g. --layerwise 0.3 (layers that overflow a level by at most 30 %)")
        hw = load_target(target)
        constraints = [Constraint.parse(metric, text, option=option) for metric, text, option in (
            ("size", max_size, "--max-size"), ("params", max_params, "--max-params"), ("macs", max_ops, "--max-ops"),
            ("latency", max_latency, "--max-latency")) if text]
        settings = SearchSettings(warmup_epochs=w, search_epochs=s, finetune_epochs=f,
                                  max_search_epochs=max_search_epochs, lr=lr, arch_lr=arch_lr, form=form,
                                  schedule="ramp" if constant_lambda is None else "constant",
                                  constant_lambda=constant_lambda or 1.0, seed=seed, layerwise=layerwise,
                                  method=method, method_options=method_options)
        code = run_optimize(model=model, target=hw, target_spec=target, constraints=constraints, settings=settings, out=out,
                            resume=resume, cache=None if no_cache else cache, use_cache=not no_cache,
                            instruments=_ir_instruments(print_between_passes, dump_ir, sys.stdout), backends=backend,
                            dory=dory, calib_batches=calib_batches, qat_epochs=qat_epochs, device=device, amp=amp)
    except DuccioError as err:
        raise _fail(err) from None
    raise typer.Exit(code)


def _launch(nproc: int) -> int:
    """`optimize --nproc N`: the same command under torchrun, N processes on this machine."""
    if "optimize" not in sys.argv:
        raise DuccioError("--nproc starts processes from the command line only", where="--nproc",
                          fix="from Python, start your script with `torchrun --nproc-per-node N`")
    args, skip = [], False
    for a in sys.argv[sys.argv.index("optimize"):]:
        if skip or a == "--nproc" or a.startswith("--nproc="):
            skip = a == "--nproc" and not skip
            continue
        args.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "duccio_fx", *args]
    return subprocess.run(command).returncode


def _path_options(method: str, alternatives: list[str] | None, estimator: str, path_costs: str | None,
                  temperature: float, temperature_decay: float, bits: bool = False,
                  seed_logit: float | None = None, argmax_share: float | None = None) -> dict[str, Any]:
    """The path methods' options; refuses them with another method (they would be silently ignored). The
    temperatures also serve --bits. `seed_logit` and `argmax_share` are passed only when given (so that earlier
    checkpoints' signatures stay as they were); the cost mode not given is the method's default."""
    given = {"--alternatives": bool(alternatives), "--estimator": estimator != "all",
             "--path-costs": path_costs is not None, "--temperature": temperature != 5.0 and not bits,
             "--temperature-decay": temperature_decay != 0.8 and not bits, "--seed-logit": seed_logit is not None,
             "--argmax-share": argmax_share is not None}
    if method not in PATH_METHODS:
        for name, used in given.items():
            if used:
                raise DuccioError(f"{name} belongs to the path methods", where=name,
                                  fix="add --method path (or path+mask)")
        return {}
    options = {"alternatives": alternatives or None, "estimator": estimator,
               "cost_mode": path_costs or PATH_DEFAULTS[method]["cost_mode"],
               "temperature": temperature, "temperature_decay": temperature_decay}
    given_values = {"seed_logit": seed_logit, "argmax_share": argmax_share}
    return {**options, **{k: v for k, v in given_values.items() if v is not None}}


def _mask_options(method: str, channel_multiple: int) -> dict[str, Any]:
    """The mask method's options (only those that differ from the defaults, so that a default run's checkpoint
    signature stays what it was); refuses them with another method."""
    check_channel_multiple(channel_multiple, where="--channel-multiple")
    if channel_multiple == 1:
        return {}
    if method != "mask":
        raise DuccioError(f"--channel-multiple belongs to the mask method (got --method {method})",
                          where="--channel-multiple", fix="add --method mask, or drop --channel-multiple")
    return {"channel_multiple": channel_multiple}


def _bits_options(method: str, bits: str | list[str] | None, bits_only: bool, temperature: float,
                  temperature_decay: float, act_bits: str | list[str] | None = None) -> dict[str, Any]:
    """`--bits 2,4,8`, `--act-bits 2,4,8` (and `--bits-only`): the mask method's precision search; refused
    elsewhere."""
    if not bits and not act_bits:
        if bits_only:
            raise DuccioError("--bits-only needs --bits or --act-bits", where="--bits-only",
                              fix="e.g. --bits 2,4,8 --bits-only")
        return {}
    options: dict[str, Any] = {}
    for name, given, key in (("--bits", bits, "bits"), ("--act-bits", act_bits, "act_bits")):
        if not given:
            continue
        if method != "mask":
            raise DuccioError(f"{name} belongs to the mask method (got --method {method})", where=name,
                              fix=f"add --method mask, or drop {name}")
        specs = [given] if isinstance(given, str) else list(given)
        rules = WidthRules(specs, name)  # refuses what does not parse
        options[key] = list(rules.widths) if len(specs) == 1 and "=" not in specs[0] else specs
    if bits_only:
        options["channels"] = False
    if (temperature, temperature_decay) != (5.0, 0.8):
        options.update(temperature=temperature, temperature_decay=temperature_decay)
    return options


@app.command("lower")
def lower_cmd(
    source: str = typer.Argument(..., help="a finished `optimize` run directory, a model file or zoo:NAME"),
    target: Optional[str] = typer.Option(None, "--target", help="a DORY target: gap8, gap9 or a TOML path "
                                         "(default: a run's own target, as its report.json records it; else gap8)"),
    out: Path = typer.Option(..., "--out", help="directory for DORY's inputs (network.onnx, config.json, goldens)"),
    calib_batches: int = typer.Option(8, "--calib-batches", help="training batches used to calibrate the scales"),
    percentile: float = typer.Option(99.99, "--percentile", help="percentile of the activations taken as range"),
    qat_epochs: int = typer.Option(0, "--qat-epochs", help="epochs of quantization-aware fine-tuning on "
                                   "train_loader() before integerizing (0: post-training quantization only)"),
    as_json: bool = typer.Option(False, "--json", help="print lowering.json on stdout instead of tables"),
    print_between_passes: bool = typer.Option(False, "--print-between-passes", help="print the IR after each pass"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after each pass to DIR/NNN_<pass>.txt"),
    device: str = typer.Option("auto", "--device", help="where calibration and --qat-epochs run: auto, cpu, cuda, "
                               "cuda:N or mps (the integer network is built on the CPU)"),
    force: bool = typer.Option(False, "--force", help="write into an --out directory that is not empty (its "
                               "files of an earlier lowering are replaced)"),
) -> None:
    """Lower a model to an 8-bit integer network that DORY turns into GAP8 C code (Quantlab ONNX, config.json,
    input.txt, out_layer{i}.txt golden activations, lowering.json), calibrated post-training on the model
    file's train_loader(). Exit 1, with nothing written, on a layer DORY cannot run."""
    try:
        code = run_lower(source=source, target=load_target(target) if target is not None else None, out=out, calib_batches=calib_batches,
                         percentile=percentile, qat_epochs=qat_epochs, as_json=as_json, device=resolve_device(device),
                         force=force,
                         instruments=_ir_instruments(print_between_passes, dump_ir,
                                                     sys.stderr if as_json else sys.stdout))
    except DuccioError as err:
        raise _fail(err) from None
    raise typer.Exit(code)


@app.command()
def sweep(
    model: str = typer.Argument(..., help="model file (see README: the model.py contract) or zoo:NAME"),
    target: str = typer.Option("gap8", "--target", help="built-in target name or a TOML path"),
    size: str = typer.Option("25%,50%,75%", "--size", help="size targets, comma-separated (none: no size bound)"),
    ops: str = typer.Option("none", "--ops", help="MAC targets, comma-separated, e.g. none,25%,50%,75%"),
    ops_of: str = typer.Option("size-only", "--ops-of", help="an ops % is of the size-only run's MACs "
                               "(size-only, the paper's protocol) or of the seed's (seed)"),
    method: str = typer.Option("mask", "--method", help="search methods, comma-separated: mask,path"),
    seeds: str = typer.Option("0", "--seeds", help="random seeds, comma-separated"),
    epochs: str = typer.Option("5,10,5", "--epochs", help="W,S,F of every point"),
    workers: int = typer.Option(1, "--workers", help="points run at once (each is one optimize process)"),
    out: Optional[Path] = typer.Option(None, "--out", help="sweep directory (default runs/sweep-<model name>)"),
    device: str = typer.Option("auto", "--device", help="device of every point: auto, cpu, cuda, cuda:N"),
    layerwise: Optional[float] = typer.Option(None, "--layerwise", help="slack C for every point"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run the points as Ray tasks: auto (a local Ray, or "
                                      "the cluster this machine belongs to) or a cluster ADDRESS"),
    channel_multiple: int = typer.Option(1, "--channel-multiple", help="--method mask: every point keeps a "
                                         "multiple of N channels per group (see optimize)"),
    bits: Optional[str] = typer.Option(None, "--bits", help="--method mask: every point also searches its "
                                       "layers' weight widths among these, e.g. 2,4,8 (see optimize)"),
    act_bits: Optional[str] = typer.Option(None, "--act-bits", help="--method mask: every point also searches its "
                                           "layers' output widths among these (see optimize)"),
    bits_only: bool = typer.Option(False, "--bits-only", help="with --bits/--act-bits: the widths alone, every "
                                   "channel kept"),
) -> None:
    """Run a grid of searches (methods x seeds x size x ops targets), sharing one warmup per method and
    seed; skip finished points when run again; write sweep.json, sweep.csv and pareto.png.

    Exit 0 when every point met its bounds, 3 when a point violated them or failed (the others still ran)."""
    try:
        if workers < 1:
            raise DuccioError(f"--workers {workers} must be at least 1", where="--workers")
        for m in method.split(","):
            if m.strip() not in search_methods():
                raise DuccioError(f"unknown search method {m.strip()!r}", where="--method",
                                  fix=f"use one of: {', '.join(search_methods())}")
        for m in method.split(","):
            _mask_options(m.strip(), channel_multiple)
            _bits_options(m.strip(), bits, bits_only, 5.0, 0.8, act_bits)
        _epochs(epochs)
        resolve_device(device)
        load_target(target)
        points = build_grid(method, seeds, size, ops, ops_of)
        for s in {p.size for p in points} - {None}:
            Constraint.parse("size", s, option="--size")
        for o in {p.ops for p in points} - {None}:
            Constraint.parse("macs", o, option="--ops")
        executor = ray_executor(ray) if ray else None
        # (another N gets its own default directory: a finished point of one N is no point of another)
        out = out or Path("runs") / (f"sweep-{Path(model.removeprefix('zoo:')).stem}"
                                     + (f"-cm{channel_multiple}" if channel_multiple > 1 else "")
                                     + (f"-bits{bits.replace(',', '')}" if bits else "")
                                     + (f"-act{act_bits.replace(',', '')}" if act_bits else "")
                                     + ("-only" if bits_only else ""))
        extra = ["--layerwise", str(layerwise)] if layerwise is not None else []
        if channel_multiple > 1:
            extra += ["--channel-multiple", str(channel_multiple)]
        if bits:
            extra += ["--bits", bits]
        if act_bits:
            extra += ["--act-bits", act_bits]
        if bits_only:
            extra += ["--bits-only"]
        spec = SweepSpec(model=model, out=out, target=target, epochs=epochs, ops_of=ops_of, workers=workers,
                         device=device, extra=extra)
        console = Console()
        say(console, f"sweep: {len(points)} points, " + (f"as Ray tasks ({ray})" if ray else f"{workers} at a time")
            + f", into {path_text(out)}")
        try:
            code = run_sweep(spec, points, console, executor)
        except KeyboardInterrupt:
            say(console, f"interrupted: finished points are kept in {path_text(out / 'points')} and interrupted ones "
                         f"resume from their checkpoints; run the same command again to finish the rest")
            raise typer.Exit(130) from None
        say(console, f"wrote {path_text(out / 'sweep.json')} and {path_text(out / 'sweep.csv')}")
        if plots_available() and any(p.status in ("met", "violated") for p in points):
            say(console, f"wrote {', '.join(path_text(p) for p in plot_sweep(out))}")
    except DuccioError as err:
        raise _fail(err) from None
    raise typer.Exit(code)


@app.command()
def plot(
    directory: Path = typer.Argument(..., help="a finished optimize run directory or a sweep directory"),
) -> None:
    """Draw a run (history.png, layers.png) or a sweep (pareto.png) as PNG files next to its reports."""
    try:
        console = Console()
        for path in plot_path(directory):
            say(console, f"wrote {path_text(path)}")
    except DuccioError as err:
        raise _fail(err) from None


targets_app = typer.Typer(no_args_is_help=True, help="List, show and validate hardware target descriptions.")
app.add_typer(targets_app, name="targets")


@targets_app.command("list")
def targets_list() -> None:
    """The built-in targets and those other packages register (entry-point group duccio_fx.targets)."""
    table = Table(title="hardware targets (use as --target NAME, or pass a TOML path)")
    for col in ("name", "origin", "description"):
        table.add_column(col)
    for t in list_targets():
        table.add_row(t.name, t.origin, t.description)
    Console().print(table)


@targets_app.command("show")
def targets_show(
    name: str = typer.Argument(..., help="target name or TOML path"),
    as_json: bool = typer.Option(False, "--json", help="print the validated description as JSON"),
) -> None:
    """Print a target's memory levels, bit widths, compute and latency model."""
    try:
        hw = load_target(name)
    except DuccioError as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(hw.model_dump_json(indent=2) + "\n")
    else:
        render_target(hw, Console(width=max(Console().width, 120)))


@targets_app.command("validate")
def targets_validate(path: Path = typer.Argument(..., help="a target TOML file")) -> None:
    """Check a target file against the schema; every problem names its field. Exit 1 when invalid."""
    try:
        hw = load_target_file(path)
    except DuccioError as err:
        raise _fail(err) from None
    say(Console(), f"[green]ok[/]: {path_text(path)} describes target '{escape(hw.name)}' with memory levels "
        + ", ".join(f"{escape(m.name)} ({m.usable:,} B usable)" for m in hw.memory))


@app.command()
def zoo() -> None:
    """List the built-in reference models (use them as zoo:NAME)."""
    table = Table(title="reference model zoo")
    table.add_column("name")
    table.add_column("input")
    table.add_column("description")
    for name in z.names():
        e = z.entry(name)
        table.add_row(name, "×".join(map(str, e.input_shape)), e.description)
    Console().print(table)


@app.command()
def methods() -> None:
    """List the search methods (optimize --method NAME) and the lowering backends (optimize --backend NAME)."""
    console = Console()
    say(console, f"search methods: {', '.join(search_methods())}")
    say(console, f"backends: {', '.join(backends())}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
