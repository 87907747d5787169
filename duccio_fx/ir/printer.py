"""The one IR printer: graph plus duccio meta, deterministic (no addresses, stable order and widths).

Used by the CLI, the `--dump-ir` files and golden tests. Its columns after `:` come from formatters
registered per meta key (`register_meta_formatter`): a pass that adds a meta key registers how it prints.
"""

from __future__ import annotations

from typing import Any, Callable

from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import (CHOICE_KEY, COST_KEY, DORY_KEY, LAYOUT_KEY, MASK_KEY, QUANT_KEY, ROLE_KEY, TENSOR_KEY,
                               TensorInfo, channel_layout, choice_info, dory_part, layer_cost, mask_use, model_name,
                               op_role, quant_spec, tensor_info)
from duccio_fx.ir.registry import describe_target

MetaFormatter = Callable[[Node], str]  # '' when the node has nothing to show for this key
_FORMATTERS: dict[str, MetaFormatter] = {}


def register_meta_formatter(key: str, formatter: MetaFormatter) -> None:
    """Show meta `key` as a column of the printed IR (columns keep registration order)."""
    _FORMATTERS[key] = formatter


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


def _fmt_layout(node: Node) -> str:
    layout = channel_layout(node)
    if layout is None:
        return ""
    return str(layout) if not isinstance(layout, tuple) else "(" + ", ".join(map(str, layout)) + ")"


def _fmt_cost(node: Node) -> str:
    cost = layer_cost(node)
    return f"params={cost.params} macs={cost.macs}" if cost and (cost.params or cost.macs) else ""


def _fmt_mask(node: Node) -> str:
    use = mask_use(node)
    return str(use) if use is not None else ""


register_meta_formatter(TENSOR_KEY, lambda n: _fmt_value(tensor_info(n)))
register_meta_formatter(ROLE_KEY, lambda n: str(op_role(n) or ""))
register_meta_formatter(LAYOUT_KEY, _fmt_layout)
register_meta_formatter(COST_KEY, _fmt_cost)
register_meta_formatter(MASK_KEY, _fmt_mask)
register_meta_formatter(CHOICE_KEY, lambda n: str(choice_info(n) or ""))
register_meta_formatter(DORY_KEY, lambda n: str(dory_part(n) or ""))
register_meta_formatter(QUANT_KEY, lambda n: str(quant_spec(n) or ""))


def format_ir(gm: GraphModule) -> str:
    """One line per node: `%name = call : type | role | channels | cost | ...`, columns aligned."""
    rows = [(f"%{node.name}", _call(gm, node), " | ".join(x for x in (f(node) for f in _FORMATTERS.values()) if x))
            for node in gm.graph.nodes]
    width = max((len(r[0]) for r in rows), default=0)
    lines = [f"graph {model_name(gm)}:"]
    for name, call, tail in rows:
        head = f"  {name:<{width}} = {call}"
        lines.append(f"{head}  : {tail}" if tail else head)
    return "\n".join(lines)
