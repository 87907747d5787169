"""The `duccio-fx` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from duccio_fx.errors import DuccioError
from duccio_fx.pass_manager import DumpIR, Instrument, PrintIR, TimePasses

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Hardware-aware neural architecture search (DUCCIO) for tiny devices, on torch.fx.")
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """duccio-fx: inspect a model's graph, channels and costs; search it under hardware constraints."""


def _fail(err: DuccioError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {err.what}", highlight=False)
    if err.where:
        err_console.print(f"  [bold]where:[/] {err.where}", highlight=False)
    if err.fix:
        err_console.print(f"  [bold]how to fix:[/] {err.fix}", highlight=False)
    return typer.Exit(1)


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model file (see README: the model.py contract) or zoo:NAME"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report on stdout instead of tables"),
    print_between_passes: bool = typer.Option(False, "--print-between-passes",
                                              help="print the IR before the first pass and after every pass"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR after each pass to DIR/NNN_<pass>.txt"),
) -> None:
    """Show every layer of MODEL with its shapes and costs, and its channel groups with frozen reasons."""
    from duccio_fx.model_file import load_model_file
    from duccio_fx.pipeline import analyze
    from duccio_fx.report import inspect_report, render_inspect

    timer = TimePasses()
    instruments: list[Instrument] = [timer]
    if print_between_passes:
        instruments.append(PrintIR(sys.stderr if as_json else sys.stdout))
    if dump_ir is not None:
        instruments.append(DumpIR(dump_ir))
    try:
        spec = load_model_file(model)
        gm = analyze(spec.model, spec.example_inputs, spec.leaf_modules, instruments)
        report = inspect_report(gm, spec.source, timer.seconds)
    except DuccioError as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_inspect(report, Console(width=max(Console().width, 160)))


@app.command()
def zoo() -> None:
    """List the built-in reference models (use them as zoo:NAME)."""
    from rich.table import Table

    from duccio_fx import zoo as z

    table = Table(title="reference model zoo")
    table.add_column("name")
    table.add_column("input")
    table.add_column("description")
    for name in z.names():
        e = z.entry(name)
        table.add_row(name, "×".join(map(str, e.input_shape)), e.description)
    Console().print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
