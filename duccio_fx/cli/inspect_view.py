"""What `inspect` shows: per-layer table, channel groups, totals — as rich tables and as JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch.fx import GraphModule

from duccio_fx.ir.meta import TensorInfo, ValueInfo, channel_group_of, layer_cost, model_name, op_role, tensor_info
from duccio_fx.ir.registry import describe_target
from duccio_fx.ir.rule_api import iter_nodes
from duccio_fx.pipeline import channel_groups

_HIDDEN_ROLES = {"no-channels"}


def _shape(info: ValueInfo) -> Any:
    if isinstance(info, TensorInfo):
        return list(info.shape)
    if isinstance(info, tuple):
        return [_shape(i) for i in info]
    return None


def inspect_report(gm: GraphModule, source: str, pass_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """A JSON-ready description of an analysed model."""
    layers = []
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        role = op_role(node)
        if role is not None and role.role in _HIDDEN_ROLES:
            continue
        cost = layer_cost(node)
        layers.append({
            "name": str(node.target) if node.op == "call_module" else node.name,
            "node": node.name,
            "op": describe_target(gm, node).split(" '")[0],
            "role": role.role if role else "unknown",
            "in_shapes": [_shape(tensor_info(a)) for a in dict.fromkeys(iter_nodes(node.args))
                          if tensor_info(a) is not None],
            "out_shape": _shape(tensor_info(node)),
            "params": cost.params if cost else 0,
            "macs": cost.macs if cost else 0,
            "input_bytes": cost.input_bytes if cost else 0,
            "output_bytes": cost.output_bytes if cost else 0,
            "groups": list(channel_group_of(node)),
        })
    groups = channel_groups(gm)
    searchable = [g for g in groups if not g.frozen]
    return {
        "model": model_name(gm),
        "source": source,
        "layers": layers,
        "groups": [{"id": g.id, "channels": g.channels, "frozen": g.frozen, "reason": g.reason,
                    "producers": list(g.producers), "consumers": list(g.consumers)} for g in groups],
        "totals": {
            "params": sum(x["params"] for x in layers),
            "macs": sum(x["macs"] for x in layers),
            "all_parameters": sum(p.numel() for p in gm.parameters()),
            "nodes": len(gm.graph.nodes),
            "groups": len(groups),
            "searchable_groups": len(searchable),
            "searchable_channels": sum(g.channels for g in searchable),
            "max_layer_activation_bytes": max((x["input_bytes"] + x["output_bytes"] for x in layers), default=0),
        },
        "pass_seconds": pass_seconds or {},
    }


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _shape_txt(shape: Any) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], list):
        return ", ".join(_shape_txt(s) for s in shape)
    return "×".join(map(str, shape))


def render_inspect(report: dict[str, Any], console: Console) -> None:
    """Print the report as rich tables."""
    layers = Table(title=f"{report['model']} ({report['source']}): layers", show_lines=False)
    for col, justify in (("layer", "left"), ("op", "left"), ("role", "left"), ("in", "right"), ("out", "right"),
                         ("params", "right"), ("MACs", "right"), ("out bytes", "right"), ("group", "left")):
        layers.add_column(col, justify=justify)  # type: ignore[arg-type]
    for x in report["layers"]:
        layers.add_row(x["name"], x["op"], x["role"], " | ".join(_shape_txt(s) for s in x["in_shapes"]),
                       _shape_txt(x["out_shape"]), f"{x['params']:,}" if x["params"] else "",
                       f"{x['macs']:,}" if x["macs"] else "", f"{x['output_bytes']:,}",
                       " ".join(f"g{g}" for g in x["groups"]))
    console.print(layers)

    groups = Table(title="channel groups (one mask each; frozen groups never change)")
    for col in ("group", "channels", "state", "producers", "consumers", "why frozen"):
        groups.add_column(col, overflow="fold")
    for g in report["groups"]:
        groups.add_row(f"g{g['id']}", str(g["channels"]), "[red]frozen[/]" if g["frozen"] else "[green]search[/]",
                       ", ".join(g["producers"]), ", ".join(g["consumers"]), g["reason"])
    console.print(groups)

    t = report["totals"]
    console.print(
        f"[bold]totals[/]: {t['params']:,} conv/linear params ({_human(t['params'])}), {t['macs']:,} MACs "
        f"({_human(t['macs'])}), {t['all_parameters']:,} parameters in all; {t['groups']} channel groups, "
        f"{t['searchable_groups']} searchable with {t['searchable_channels']:,} channels; "
        f"largest layer activations {t['max_layer_activation_bytes']:,} B")
    if report["pass_seconds"]:
        console.print("passes: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in report["pass_seconds"].items()))


def blocks_text(blocks: list[int]) -> str:
    """How a group is cut: "16 × 4", "2 × 4 + 2", "12" (one block)."""
    if not blocks:
        return "-"
    head = blocks[0]
    full = sum(1 for b in blocks if b == head)
    rest = blocks[full:]
    text = f"{full} × {head}" if full > 1 else str(head)
    return text + "".join(f" + {b}" for b in rest)


def render_widths(widths: list[dict[str, Any]], multiple: int, console: Console, kept: bool = False) -> None:
    """The channel groups cut into blocks of `--channel-multiple N`; `kept`: also the width each group keeps."""
    table = Table(title=f"channel groups in blocks of {multiple} channels (--channel-multiple {multiple})")
    for col in ("group", "producers", "channels", "blocks", *(["kept"] if kept else []), f"multiple of {multiple}",
                "note"):
        table.add_column(col, overflow="fold")
    for w in widths:
        ok = w["kept_multiple"] if kept else w["multiple_holds"]
        verdict = ("[green]yes[/]" if ok else "[yellow]no[/]") if w["searchable"] else "[dim]fixed[/]"
        table.add_row(f"g{w['id']}", ", ".join(w["producers"]), str(w["channels"]),
                      blocks_text(w["blocks"]) if w["searchable"] else "[dim]not searched[/]",
                      *([str(w["kept"])] if kept else []), verdict, escape(w["note"]))
    console.print(table)


def render_precisions(rows: list[dict[str, Any]], console: Console, chosen: bool = True,
                      title: str = "weight precision (--bits)") -> None:
    """Every quantisable layer's weight widths (--bits); `chosen`: also the one the search chose and how sure
    it is of it (its probability, then the others')."""
    table = Table(title=title)
    for col in ("layer", "widths", *(["bits", "probability", "others"] if chosen else []), "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        widths = ",".join(map(str, r["widths"])) if r["widths"] else "[dim]target's[/]"
        if not chosen:
            table.add_row(r["layer"], widths, escape(r["note"]))
        elif r["bits"] is None:
            table.add_row(r["layer"], widths, "", "", "", escape(r["note"]))
        else:
            p = r["probabilities"]
            others = ", ".join(f"{b}-bit {v:.2f}" for b, v in p.items() if b != str(r["bits"]))
            table.add_row(r["layer"], widths, str(r["bits"]), f"{p[str(r['bits'])]:.2f}", others, escape(r["note"]))
    console.print(table)
