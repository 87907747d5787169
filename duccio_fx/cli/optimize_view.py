"""What `optimize` shows: live progress while it runs, then report.json (for scripts) and a readable summary,
seed vs result."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from duccio_fx.cli.inspect_view import render_precisions, render_widths
from duccio_fx.cli.output import path_text, say
from duccio_fx.cli.path_view import render_choices
from duccio_fx.costs.metrics import get_metric
from duccio_fx.search.path_method import PATH_METHODS
from duccio_fx.search.recipe import EpochRecord, SearchResult
from duccio_fx.search.settings import SearchSettings
from duccio_fx.targets import Target


def _fmt(value: float, metric: str) -> str:
    return f"{value * 1e3:.3f}ms" if metric == "latency" else f"{value:,.0f}"


class LiveProgress:
    """Rich progress: one bar per phase, one line per epoch with loss, metric and each constraint."""

    def __init__(self, console: Console, settings: SearchSettings) -> None:
        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(), console=console)
        # the search runs between search_epochs and its limit: the bar counts to the limit and is closed at
        # the epoch it stops ("done")
        self.totals = {"warmup": settings.warmup_epochs, "search": settings.search_limit,
                       "finetune": settings.finetune_epochs}
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "cached":
            say(self.console, f"warmup: reused from the cache ({path_text(data['path'])})")
            return
        if event == "resumed":
            self.console.print(f"resuming: {data['phase']} epoch {data['epoch'] + 1} was the last one saved; "
                               f"continuing from there", highlight=False)
            return
        phase = data.get("phase") or data["record"].phase
        if event == "done":
            if phase in self.tasks:
                self.progress.update(self.tasks[phase], total=data["epochs"], completed=data["epochs"])
            return
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
        for c, (label, value) in zip(data["constraints"], rec.costs.items()):
            ok = value <= c.bound * (1 + 1e-12)
            parts.append(f"{label} {_fmt(value, c.metric)}/{_fmt(c.bound, c.metric)} "
                         f"{'[green]ok[/]' if ok else '[red]over[/]'}")
        self.progress.update(task, completed=min(rec.epoch + 1, self.totals[phase]), total=max(
            self.totals[phase], rec.epoch + 1))
        self.console.print(" | ".join(parts))


def _layers(costs: dict[str, Any], target_rep: dict[str, Any] | None) -> dict[str, Any]:
    """Per layer of one architecture: bytes, elements, level and cycles (the target report's layers when given:
    a search space's cost tables may also hold layers the architecture does not use)."""
    levels = {x["name"]: x for x in target_rep["layers"]} if target_rep else {}
    names = levels or costs.get("layer_bytes") or costs["layer_memory"]
    return {n: {"bytes": levels[n]["bytes"] if n in levels else costs.get("layer_bytes", {}).get(n),
                "elements": costs["layer_memory"].get(n), "level": levels.get(n, {}).get("level"),
                "cycles": levels[n]["cycles"] if n in levels else costs.get("layer_cycles", {}).get(n)}
            for n in names}


def _summary(costs: dict[str, Any]) -> dict[str, Any]:
    keys = ("params", "macs", "size_bytes", "cycles", "latency_s")
    out = {k: costs[k] for k in keys if k in costs}
    if "overflow_bytes" in costs:
        out["overflow_bytes"] = costs["overflow_bytes"]
    return out


def build_report(result: SearchResult, source: str, target: Target | None, seed_target: dict[str, Any] | None,
                 final_target: dict[str, Any] | None, checks: dict[str, float], files: dict[str, str], *,
                 target_spec: dict[str, Any] | None = None) -> dict[str, Any]:
    constraints = []
    for c in result.constraints:
        constraints.append({"constraint": c.label, "metric": c.metric, "scope": c.scope, "as_written": c.text,
                            "bound": c.bound, "seed": float(c.value(result.seed_costs)),
                            "final": float(c.value(result.final_costs)), "met": c.met(result.final_costs),
                            "excess": max(0.0, c.violation(result.final_costs)), "description": c.describe()})
    report = {
        "source": source,
        "target": target.name if target is not None else None,
        "target_spec": target_spec,  # how to load it again (a TOML file's path and text): lower and plot read it
        "method": result.searchable.method,
        "architecture": result.searchable.architecture(),
        # mask method: every channel group's seed width, blocks (--channel-multiple) and the width it kept
        **({"channel_multiple": result.searchable.channel_multiple,  # type: ignore[attr-defined]
            "widths": result.searchable.width_report()}  # type: ignore[attr-defined]
           if hasattr(result.searchable, "width_report") else {}),
        # mask method with --bits: every quantisable layer's chosen weight width and its probabilities
        **({"weight_bits": result.searchable.precision_report()}  # type: ignore[attr-defined]
           if getattr(result.searchable, "precision", None) is not None else {}),
        # with --act-bits: every layer's chosen output width
        **({"act_bits": result.searchable.precision_report(activations=True)}  # type: ignore[attr-defined]
           if getattr(result.searchable, "act_precision", None) is not None else {}),
        "status": "met" if result.met else "violated",
        "constraints": constraints,
        "bound_use": [],  # filled below from the constraints and the metrics
        "critical_layers": result.critical,
        "seed": _summary(result.seed_costs) | {"val_metric_after_warmup": result.seed_metric},
        "final": _summary(result.final_costs) | {"val_metric_before_finetune": result.search_metric,
                                                 "val_metric": result.final_metric},
        "layers": {"seed": _layers(result.seed_costs, seed_target), "final": _layers(result.final_costs, final_target)},
        "phase_seconds": result.phase_seconds,
        "warmup_from_cache": result.warmup_cached,
        "onnx_max_abs_diff": checks.get("onnx_max_abs_diff"),
        "checks": checks,
        "files": files,
        # epochs count from 1 within each phase, as on the console and in the plots
        "exported_epoch": None if result.exported_epoch is None else {
            "phase": "search", "epoch": result.exported_epoch + 1, "met": result.exported_feasible},
        "history": [dict(asdict(r), epoch=r.epoch + 1) for r in result.history],
    }
    report["bound_use"] = bound_use(report)
    return report


UNUSED_BUDGET = 0.6  # a result below this fraction of a binding bound left budget the search could use
UNDER_SPENT = 0.7  # below this fraction of a binding bound with less accuracy than the seed: a search failure


def bound_use(report: dict[str, Any]) -> list[dict[str, Any]]:
    """How much of each binding global bound the result uses (final / bound). `under_spent`: it uses less than
    70 % and is less accurate than the seed after warmup, so the search gave away accuracy it had room to keep
    (the path method's coarse choices do this); a result that is under its bound and as accurate is fine."""
    seed_metric, final_metric = report["seed"]["val_metric_after_warmup"], report["final"]["val_metric"]
    rows = []
    for c in report["constraints"]:
        if c["scope"] is not None or not c["seed"] > c["bound"] > 0:
            continue
        use = c["final"] / c["bound"]
        rows.append({"constraint": c["constraint"], "use": use,
                     "under_spent": bool(c["met"] and use < UNDER_SPENT and final_metric < seed_metric)})
    return rows


def budget_notes(report: dict[str, Any], settings: SearchSettings) -> list[str]:
    """A met bound the result stays far below (< 60 %), though the seed was above it: the search stopped
    before it could trade the spare budget back for accuracy (a mask or path only grows again while the task
    loss pulls it back, which takes epochs)."""
    if report["status"] != "met":
        return []
    notes = [f"{u['constraint']} ends at {u['use']:.0%} of its bound with less accuracy than the seed "
             f"({report['final']['val_metric']:.4f}, the seed {report['seed']['val_metric_after_warmup']:.4f} "
             f"after warmup): the {report['method']} search gave up accuracy it had budget for"
             for u in report.get("bound_use", []) if u["under_spent"]]
    for c in report["constraints"]:
        if c["scope"] is None and c["seed"] > c["bound"] > 0 and c["final"] < UNUSED_BUDGET * c["bound"]:
            m = get_metric(c["metric"])
            notes.append(f"{c['constraint']} ends at {c['final'] / c['bound']:.0%} of its bound "
                         f"({m.describe(c['final'])} of {m.describe(c['bound'])}): more search epochs "
                         f"(a larger S in --epochs W,S,F than {settings.search_epochs}, or --max-search-epochs) "
                         "would let the search use the budget left for accuracy")
    return notes


def _num(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1e3:.3f} ms"
    return f"{x:,.0f}" + (f" {unit}" if unit else "")


def render_summary(report: dict[str, Any], console: Console) -> None:
    seed, final = report["seed"], report["final"]
    table = Table(title=f"duccio-fx optimize: {report['source']}" + (f" on {report['target']}" if report["target"] else ""))
    for col in ("", "seed", "result", "change"):
        table.add_column(col, justify="right" if col else "left")
    rows = [("params", "params", ""), ("MACs", "macs", ""), ("size", "size_bytes", "B"),
            ("latency", "latency_s", "s"), ("cycles", "cycles", "")]
    for label, key, unit in rows:
        if key in seed:
            change = f"{100 * (final[key] / seed[key] - 1):+.1f} %" if seed[key] else ""
            table.add_row(label, _num(seed[key], unit), _num(final[key], unit), change)
    for level, v in seed.get("overflow_bytes", {}).items():
        table.add_row(f"{level}V (bytes over {level})", _num(v, "B"), _num(final["overflow_bytes"][level], "B"), "")
    table.add_row("val metric", f"{seed['val_metric_after_warmup']:.4f} (warmup)",
                  f"{final['val_metric']:.4f} (fine-tuned; {final['val_metric_before_finetune']:.4f} before)", "")
    console.print(table)
    cons = Table(title="constraints")
    for col in ("constraint", "bound", "seed", "final", "status"):
        cons.add_column(col)
    for c in report["constraints"]:
        unit = "s" if c["metric"] == "latency" else ""
        status = "[green]met[/]" if c["met"] else f"[bold red]VIOLATED by {_num(c['excess'], unit)}[/]"
        cons.add_row(c["description"], _num(c["bound"], unit), _num(c["seed"], unit), _num(c["final"], unit), status)
    console.print(cons)
    if report.get("architecture") and report["method"] in PATH_METHODS:
        render_choices(report["architecture"], console)
    if report.get("weight_bits"):
        render_precisions(report["weight_bits"], console)
    if report.get("act_bits"):
        render_precisions(report["act_bits"], console, title="activation precision (--act-bits)")
    if report.get("channel_multiple", 1) > 1:
        render_widths(report["widths"], report["channel_multiple"], console, kept=True)
        off = [f"g{w['id']} ({w['kept']})" for w in report["widths"] if w["searchable"] and not w["kept_multiple"]]
        if off:
            console.print(f"[yellow]note:[/] kept widths that are not a multiple of {report['channel_multiple']}: "
                          + ", ".join(off) + " (groups whose width it does not divide; see the table)",
                          highlight=False)
    exported = report.get("exported_epoch")
    if exported:
        console.print(f"exported: search epoch {exported['epoch']} ("
                      + ("the lowest validation loss of the epochs that met every constraint)" if exported["met"] else
                         "no search epoch met every constraint: the last one)"), highlight=False)
    levels = report["layers"]["final"]
    moved = [f"{n}: {report['layers']['seed'][n]['level']} -> {x['level']}" for n, x in levels.items()
             if x["level"] and n in report["layers"]["seed"] and report["layers"]["seed"][n]["level"] != x["level"]]
    if moved:
        console.print("memory levels changed: " + ", ".join(moved))
    times = ", ".join(f"{k} {v:.1f} s" for k, v in report["phase_seconds"].items())
    console.print(f"time: {times}" + (" (warmup from cache)" if report["warmup_from_cache"] else ""))
    for kind, path in report["files"].items():
        say(console, f"{kind}: {path_text(path)}")
