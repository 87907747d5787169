"""The one IR printer: graph plus duccio meta, deterministic (no addresses, stable order and widths).

Used by the CLI, the `--dump-ir` files and golden tests.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule, Node

from duccio_fx.meta import TensorInfo, channel_layout, layer_cost, op_role, tensor_info
from duccio_fx.registry import describe_target


def _fmt_arg(value: Any) -> str:
    if isinstance(value, Node):
        return f"%{value.name}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_fmt_arg(v) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt_arg(v)}" for k, v in value.items()) + "}"
    if isinstance(value, slice):
        return ":".join("" if v is None else _fmt_arg(v) for v in (value.start, value.stop, value.step)).rstrip(":") \
            or ":"
    if value is Ellipsis:
        return "..."
    return repr(value)


def _fmt_value(info: Any) -> str:
    if isinstance(info, TensorInfo):
        return str(info)
    if isinstance(info, tuple):
        return "(" + ", ".join(_fmt_value(i) for i in info) + ")"
    return "-"


def _call(gm: GraphModule, node: Node) -> str:
    args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return f"get_attr {node.target}"
    if node.op == "output":
        return f"return {', '.join(args)}"
    return f"{describe_target(gm, node)}({', '.join(args)})"


def format_ir(gm: GraphModule) -> str:
    """One line per node: `%name = call : type | role | channels | cost`, columns aligned."""
    rows = []
    for node in gm.graph.nodes:
        role = op_role(node)
        layout = channel_layout(node)
        cost = layer_cost(node)
        cost_txt = f"params={cost.params} macs={cost.macs}" if cost and (cost.params or cost.macs) else ""
        layout_txt = "" if layout is None else (
            str(layout) if not isinstance(layout, tuple) else "(" + ", ".join(map(str, layout)) + ")")
        rows.append((f"%{node.name}", _call(gm, node), _fmt_value(tensor_info(node)),
                     str(role) if role else "", layout_txt, cost_txt))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(len(rows[0]) if rows else 0)]
    lines = [f"graph {type(gm).__name__ if type(gm).__name__ != 'GraphModule' else gm._get_name()}:"]
    for r in rows:
        head = f"  {r[0]:<{widths[0]}} = {r[1]}"
        tail = " | ".join(x for x in (r[2], r[3], r[4], r[5]) if x)
        lines.append(f"{head}  : {tail}" if tail else head)
    return "\n".join(lines)
