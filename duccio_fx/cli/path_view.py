"""What `inspect --method path` and the optimize summary show about choice points: each point's
alternatives with their costs, the layers kept fixed with their reason, and the alternatives chosen."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from duccio_fx.costs.program import plain_costs
from duccio_fx.search.path_method import PathSpace
from duccio_fx.targets import Target


def path_report(space: PathSpace, target: Target | None) -> dict[str, Any]:
    """Choice points (alternatives and their costs; the first is the seed's) and fixed layers, JSON-ready."""
    points = []
    for info in space.infos:
        options = []
        for option in info.options:
            costs = plain_costs(option.terms, target)
            row = {"name": option.name, "layers": [t.name for t in option.terms], "params": costs.params,
                   "macs": costs.macs}
            if target is not None:
                row |= {"size_bytes": costs.size_bytes, "cycles": costs.cycles,
                        "largest_layer_bytes": max(costs.layer_bytes.values(), default=0.0)}
            options.append(row)
        points.append({"point": info.point, "declared": info.declared, "alternatives": options,
                       "not_offered": dict(space.dropped.get(info.point, {}))})
    return {"points": points, "fixed": dict(space.fixed), "alternatives_per_point":
            sum(len(p["alternatives"]) for p in points) / max(len(points), 1)}


def render_path_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="choice points (path method; the first alternative is the seed's)")
    with_target = any("cycles" in a for p in report["points"] for a in p["alternatives"])
    cols = ["point", "alternative", "params", "MACs"] + (["size B", "largest layer B", "cycles"] if with_target else [])
    for col in cols:
        table.add_column(col, justify="left" if col in ("point", "alternative") else "right")
    for p in report["points"]:
        for i, a in enumerate(p["alternatives"]):
            point = p["point"] + (" (Choice)" if p["declared"] else "") if i == 0 else ""
            row = [point, a["name"] + (" *" if i == 0 else ""), f"{a['params']:,.0f}", f"{a['macs']:,.0f}"]
            if with_target:
                row += [f"{a['size_bytes']:,.0f}", f"{a['largest_layer_bytes']:,.0f}", f"{a['cycles']:,.0f}"]
            table.add_row(*row)
    console.print(table)
    dropped = [(p["point"], name, why) for p in report["points"] for name, why in p.get("not_offered", {}).items()]
    if dropped:
        skipped = Table(title="alternatives of the default set not offered")
        for col in ("point", "alternative", "why"):
            skipped.add_column(col, overflow="fold")
        for row in dropped:
            skipped.add_row(*row)
        console.print(skipped)
    fixed = Table(title="layers kept as they are")
    fixed.add_column("layer")
    fixed.add_column("why", overflow="fold")
    for layer, why in report["fixed"].items():
        fixed.add_row(layer, why)
    console.print(fixed)
    console.print(f"{len(report['points'])} choice points, {len(report['fixed'])} layers kept; * = the seed's block")


def render_choices(architecture: dict[str, Any], console: Console) -> None:
    """The alternative each point chose, with its probability (and, with path+mask, the channels it keeps)."""
    table = Table(title="alternatives chosen")
    masked = any("channels" in x for x in architecture.values())
    for col in ("point", "chosen", "probability", "others") + (("channels kept",) if masked else ()):
        table.add_column(col)
    for point, x in architecture.items():
        probs = x["probabilities"]
        others = ", ".join(f"{k} {v:.2f}" for k, v in probs.items() if k != x["choice"])
        extra = (str(x.get("channels", "")),) if masked else ()
        table.add_row(point, x["choice"], f"{probs[x['choice']]:.2f}", others, *extra)
    console.print(table)
