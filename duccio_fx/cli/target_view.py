"""`duccio-fx targets show`: a target description as readable tables."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from duccio_fx.cli.output import say
from duccio_fx.common.units import human_bytes
from duccio_fx.targets import Target


def render_target(target: Target, console: Console) -> None:
    console.print(f"[bold]{target.name}[/]: {target.description}", highlight=False)
    levels = Table(title="memory levels (fastest first)")
    for col in ("level", "size B", "reserved B", "usable B", "holds", "layer-wise", "bytes/cycle"):
        levels.add_column(col, no_wrap=True)
    for m in target.memory:
        levels.add_row(m.name + (" (off-chip)" if m.off_chip else ""), f"{m.size:,}", f"{m.reserved:,}",
                       f"{m.usable:,} ({human_bytes(m.usable)})", ", ".join(m.holds), "yes" if m.layerwise else "",
                       "" if m.bytes_per_cycle is None else f"{m.bytes_per_cycle:g}")
    console.print(levels)
    for m in target.memory:
        notes = "; ".join(x for x in (m.reserved_for and f"reserved for {m.reserved_for}", m.note) if x)
        if notes:
            console.print(f"  {m.name}: {notes}", highlight=False)
    b, c, lat = target.bits, target.compute, target.latency
    console.print(f"bits: weights {b.weights}, activations {b.activations}, bias {b.bias}, requant k/l {b.requant}")
    console.print(f"compute: {c.cores} core(s) at {c.clock / 1e6:g} MHz, peak {c.peak_macs_per_cycle:g} MAC/cycle"
                  + (f" ({c.note})" if c.note else ""), highlight=False)
    rates = ", ".join(f"{k} {v:g}" for k, v in lat.macs_per_cycle.items())
    console.print(f"latency model: {lat.model}" + (f" (MAC/cycle: {rates})" if rates else "")
                  + (f"; {lat.note}" if lat.note else ""), highlight=False)
    if target.accounting.grouped_factor != 1:
        console.print(f"accounting: grouped/depthwise weights counted x{target.accounting.grouped_factor} "
                      f"({target.accounting.note})", highlight=False)
    if target.deployment.toolchain:
        console.print(f"deployment: {target.deployment.toolchain} {target.deployment.platform}")
    for s in target.sources:
        say(console, f"source: {escape(s)}")
