"""The op registry: which channel rule applies to a node (module type, function or tensor method).

Rules live in `duccio_fx.rules`; this module only stores and finds them, so users can add their own:

    import duccio_fx
    duccio_fx.register_module(MySwish, "follows")           # element-wise leaf module
    duccio_fx.register_function(my_op, my_rule, role="couples")

An op with no rule is *unknown*: the channel analysis freezes the groups it touches and says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Union

from torch import nn
from torch.fx import GraphModule, Node

if TYPE_CHECKING:
    from duccio_fx.rules import RuleContext

RuleFn = Callable[["RuleContext", Node], Any]


@dataclass(frozen=True)
class ChannelRule:
    """A named channel role and the function that applies it to a node."""

    role: str
    apply: RuleFn
    name: str


@dataclass
class OpRegistry:
    modules: dict[type, ChannelRule] = field(default_factory=dict)
    functions: dict[Any, ChannelRule] = field(default_factory=dict)
    methods: dict[str, ChannelRule] = field(default_factory=dict)
    leaf_modules: set[type] = field(default_factory=set)

    def lookup(self, gm: GraphModule, node: Node) -> ChannelRule | None:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            for cls in type(module).__mro__:
                if cls in self.modules:
                    return self.modules[cls]
            return None
        if node.op == "call_function":
            return self.functions.get(node.target)
        if node.op == "call_method":
            return self.methods.get(str(node.target))
        return None

    def is_leaf(self, module: nn.Module) -> bool:
        return any(isinstance(module, cls) for cls in self.leaf_modules)


REGISTRY = OpRegistry()

RoleOrRule = Union[str, RuleFn]


def _as_rule(role_or_rule: RoleOrRule, role: str | None, name: str) -> ChannelRule:
    if isinstance(role_or_rule, str):
        from duccio_fx.rules import ROLE_RULES

        if role_or_rule not in ROLE_RULES:
            raise ValueError(f"unknown channel role {role_or_rule!r}; known roles: {', '.join(sorted(ROLE_RULES))}")
        return ChannelRule(role_or_rule, ROLE_RULES[role_or_rule], name)
    return ChannelRule(role or "custom", role_or_rule, name)


def register_module(cls: type[nn.Module], rule: RoleOrRule, *, role: str | None = None, leaf: bool = True,
                    registry: OpRegistry = REGISTRY) -> None:
    """Give module type `cls` (and its subclasses) a channel rule; `leaf` keeps the tracer out of it.

    `rule` is a role name ("follows", "defines", "couples", "blocks", ...) or a function
    `(ctx: RuleContext, node) -> layout` for anything else.
    """
    registry.modules[cls] = _as_rule(rule, role, cls.__name__)
    if leaf:
        registry.leaf_modules.add(cls)


def register_function(fn: Any, rule: RoleOrRule, *, role: str | None = None,
                      registry: OpRegistry = REGISTRY) -> None:
    """Give a free function (e.g. `torch.cat`, `operator.add`, a `torch.fx.wrap`ped helper) a rule."""
    registry.functions[fn] = _as_rule(rule, role, function_name(fn))


def register_method(name: str, rule: RoleOrRule, *, role: str | None = None,
                    registry: OpRegistry = REGISTRY) -> None:
    """Give a tensor method (`x.view(...)` → "view") a rule."""
    registry.methods[name] = _as_rule(rule, role, f"Tensor.{name}")


def describe_target(gm: GraphModule, node: Node) -> str:
    """Human name of what a node calls: `nn.Conv2d 'layer1.0.conv1'`, `torch.cat`, `Tensor.view`."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__} '{node.target}'"
    if node.op == "call_function":
        return function_name(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return f"{node.op} {node.target}"



def function_name(fn: Any) -> str:
    """`torch.cat`, `torch.nn.functional.relu`, `operator.add`, or `module.qualname` for user functions."""
    import operator

    import torch
    import torch.nn.functional as F

    name = getattr(fn, "__name__", None) or str(fn)
    if getattr(operator, name, None) is fn:
        return f"operator.{name}"
    if getattr(F, name, None) is fn:
        return f"torch.nn.functional.{name}"
    if getattr(torch, name, None) is fn:
        return f"torch.{name}"
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", name)
    return f"{module}.{qual}" if module and module != "builtins" else qual
