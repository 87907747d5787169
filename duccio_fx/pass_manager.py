"""Passes and the pass manager.

A pass is a small named unit: its options are dataclass fields, `run(gm)` returns whether it changed the
graph. The manager runs a pipeline, lints and recompiles after a pass that changed the graph, names the
failing pass in errors, and calls instruments around each pass (print IR, dump IR files, time passes).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence, TextIO

from torch.fx import GraphModule

from duccio_fx.errors import DuccioError, PassError


class Pass(ABC):
    """One analysis or transformation of the IR. `name` is kebab-case and matches the file name."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, gm: GraphModule) -> bool:
        """Apply the pass; return True if the graph itself (not only meta) changed."""


class Instrument:
    """Hooks around every pass of a pipeline."""

    def before_pipeline(self, gm: GraphModule) -> None:
        pass

    def after_pass(self, index: int, p: Pass, gm: GraphModule, changed: bool, seconds: float) -> None:
        pass


@dataclass
class PrintIR(Instrument):
    """Print the IR after every pass (and the input IR first)."""

    stream: TextIO | None = None

    def _print(self, title: str, gm: GraphModule) -> None:
        from duccio_fx.printer import format_ir

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
        from duccio_fx.printer import format_ir

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
class PassManager:
    passes: Sequence[Pass]
    instruments: Sequence[Instrument] = ()

    def run(self, gm: GraphModule) -> bool:
        for inst in self.instruments:
            inst.before_pipeline(gm)
        any_change = False
        for index, p in enumerate(self.passes):
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
                                where=f"pass '{p.name}' (step {index + 1} of {len(self.passes)})",
                                fix="run with --dump-ir DIR to see the IR this pass received, and report "
                                    "it with the model") from err
            seconds = time.perf_counter() - start
            any_change |= changed
            for inst in self.instruments:
                inst.after_pass(index, p, gm, changed, seconds)
        return any_change
