"""Passes, the pass context of a whole flow, and the pass manager.

A pass is a small named unit: its options are dataclass fields, `run(gm)` returns whether it changed the
graph, and `requires` names the passes that must have run on the graph before it. The manager runs a
pipeline, checks those requirements, lints and recompiles after a pass that changed the graph, names the
failing pass in errors, and calls instruments around each pass (print IR, dump IR files, time passes).

One `PassContext` travels through the whole flow (analysis, mask insertion, export, lowering), so the
user's instruments see every pass of it, numbered in order, even though several pipelines run.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence, TextIO

from torch.fx import GraphModule

from duccio_fx.common.errors import DuccioError, PassError
from duccio_fx.ir.meta import passes_run, record_pass
from duccio_fx.ir.printer import format_ir


class Pass(ABC):
    """One analysis or transformation of the IR. `name` is kebab-case and matches the file name."""

    name: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()  # names of passes that must have run on the graph first

    @abstractmethod
    def run(self, gm: GraphModule) -> bool:
        """Apply the pass; return True if the graph itself (not only meta) changed."""


class Instrument:
    """Hooks around every pass of a flow."""

    def before_pipeline(self, gm: GraphModule) -> None:
        pass

    def after_pass(self, index: int, p: Pass, gm: GraphModule, changed: bool, seconds: float) -> None:
        pass


@dataclass
class PrintIR(Instrument):
    """Print the IR after every pass (and the input IR first)."""

    stream: TextIO | None = None

    def _print(self, title: str, gm: GraphModule) -> None:
        print(f"// ----- {title} -----\n{format_ir(gm)}", file=self.stream, flush=True)

    def before_pipeline(self, gm: GraphModule) -> None:
        self._print("input", gm)

    def after_pass(self, index: int, p: Pass, gm: GraphModule, changed: bool, seconds: float) -> None:
        self._print(f"after {p.name}", gm)


@dataclass
class DumpIR(Instrument):
    """Write the IR to `NNN_<pass>.txt` in `directory` after every pass (`000_input.txt` first)."""

    directory: Path

    def _write(self, stem: str, gm: GraphModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{stem}.txt.tmp"
        tmp.write_text(format_ir(gm) + "\n")
        tmp.replace(self.directory / f"{stem}.txt")

    def before_pipeline(self, gm: GraphModule) -> None:
        self._write("000_input", gm)

    def after_pass(self, index: int, p: Pass, gm: GraphModule, changed: bool, seconds: float) -> None:
        self._write(f"{index + 1:03d}_{p.name}", gm)


@dataclass
class TimePasses(Instrument):
    """Collect wall-clock seconds per pass (in pipeline order)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def after_pass(self, index: int, p: Pass, gm: GraphModule, changed: bool, seconds: float) -> None:
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + seconds


@dataclass
class PassContext:
    """What every pipeline of one flow shares: the user's instruments and the running pass count.

    The first pipeline run in a context shows its input to the instruments (`000_input`); later pipelines
    continue the numbering, so `--dump-ir` of a whole search reads analysis → mask insertion → export.
    """

    instruments: Sequence[Instrument] = ()
    passes_run: int = 0

    def run(self, gm: GraphModule, passes: Sequence[Pass]) -> bool:
        """Run `passes` on `gm` with this context's instruments."""
        return PassManager(passes, context=self).run(gm)


@dataclass
class PassManager:
    passes: Sequence[Pass]
    instruments: Sequence[Instrument] = ()
    context: PassContext | None = None

    def run(self, gm: GraphModule) -> bool:
        ctx = self.context if self.context is not None else PassContext(self.instruments)
        instruments = list(ctx.instruments) + [i for i in self.instruments if i not in ctx.instruments]
        if ctx.passes_run == 0:
            for inst in instruments:
                inst.before_pipeline(gm)
        any_change = False
        for step, p in enumerate(self.passes):
            self._check_requirements(gm, p, step)
            start = time.perf_counter()
            try:
                changed = p.run(gm)
                if changed:
                    gm.graph.lint()
                    gm.recompile()
            except DuccioError as err:
                raise err.locate(f"pass '{p.name}'")
            except Exception as err:  # a bug or an unexpected graph: say which pass, keep the cause
                raise PassError(f"pass '{p.name}' failed: {type(err).__name__}: {err}",
                                where=f"pass '{p.name}' (step {step + 1} of {len(self.passes)})",
                                fix="run with --dump-ir DIR to see the IR this pass received, and report "
                                    "it with the model") from err
            seconds = time.perf_counter() - start
            record_pass(gm, p.name)
            any_change |= changed
            for inst in instruments:
                inst.after_pass(ctx.passes_run, p, gm, changed, seconds)
            ctx.passes_run += 1
        return any_change

    def _check_requirements(self, gm: GraphModule, p: Pass, step: int) -> None:
        done = passes_run(gm)
        missing = [r for r in p.requires if r not in done]
        if missing:
            raise PassError(f"pass '{p.name}' needs {', '.join(repr(m) for m in missing)} to have run on this graph",
                            where=f"pass '{p.name}' (step {step + 1} of {len(self.passes)})",
                            fix=f"run {', '.join(missing)} before {p.name} (duccio_fx.analyze runs the analysis "
                                "passes in order)")
