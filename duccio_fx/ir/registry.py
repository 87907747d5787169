"""The op registry: which channel rule applies to a node (module type, function or tensor method).

Rules live in `duccio_fx.ir.rules` (the table of built-in ops in `duccio_fx.ir.builtin_rules`); this module
only stores and finds them, so users can add their own:

    import duccio_fx
    duccio_fx.register_module(MySwish, "follows")           # element-wise leaf module
    duccio_fx.register_function(my_op, my_rule, role="couples")

An op with no rule is *unknown*: the channel analysis freezes the groups it touches and says so.

An entry may also carry *hooks*: what a transform needs to know about the op, by kind (`"shrink"`: how the
op is rewritten when channels are removed on export; a lowering backend adds its own kinds). Op knowledge
stays in one table instead of if-ladders on op names in the passes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

RuleFn = Callable[[Any, Node], Any]  # (RuleContext, node) -> layout; see duccio_fx.ir.rule_api
Hook = Callable[..., Any]


@dataclass(frozen=True)
class ChannelRule:
    """A named channel role, the function that applies it to a node, and the op's transform hooks."""

    role: str
    apply: RuleFn
    name: str
    hooks: Mapping[str, Hook] = field(default_factory=dict)


@dataclass
class OpRegistry:
    modules: dict[type, ChannelRule] = field(default_factory=dict)
    functions: dict[Any, ChannelRule] = field(default_factory=dict)
    methods: dict[str, ChannelRule] = field(default_factory=dict)
    leaf_modules: set[type] = field(default_factory=set)
    # functions of optional packages, by qualified name, so the table needs no import of them
    function_names: dict[str, ChannelRule] = field(default_factory=dict)
    module_hooks: dict[str, Hook] = field(default_factory=dict)  # by kind: for modules whose entry has none

    def lookup(self, gm: GraphModule, node: Node) -> ChannelRule | None:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            for cls in type(module).__mro__:
                if cls in self.modules:
                    return self.modules[cls]
            return None
        if node.op == "call_function":
            found = self.functions.get(node.target)
            return found if found is not None or not self.function_names else \
                self.function_names.get(function_name(node.target))
        if node.op == "call_method":
            return self.methods.get(str(node.target))
        return None

    def hook(self, gm: GraphModule, node: Node, kind: str) -> Hook | None:
        """The `kind` hook of the node's op (e.g. "shrink"); a module call whose entry has none (or that has no
        entry) gets the registry's default module hook of that kind, if any."""
        rule = self.lookup(gm, node)
        hook = rule.hooks.get(kind) if rule is not None else None
        if hook is None and node.op == "call_module":
            hook = self.module_hooks.get(kind)
        return hook

    def is_leaf(self, module: nn.Module) -> bool:
        return any(isinstance(module, cls) for cls in self.leaf_modules)


REGISTRY = OpRegistry()

# Channel roles users may name instead of writing a rule; filled by duccio_fx.ir.rules.
ROLE_RULES: dict[str, RuleFn] = {}

RoleOrRule = Union[str, RuleFn]


def register_role(name: str, rule: RuleFn) -> None:
    """Make `name` usable as a role in `register_module(cls, name)` and friends."""
    ROLE_RULES[name] = rule


def _as_rule(role_or_rule: RoleOrRule, role: str | None, name: str, hooks: Mapping[str, Hook] | None) -> ChannelRule:
    if isinstance(role_or_rule, str):
        if role_or_rule not in ROLE_RULES:
            raise ValueError(f"unknown channel role {role_or_rule!r}; known roles: {', '.join(sorted(ROLE_RULES))}")
        return ChannelRule(role_or_rule, ROLE_RULES[role_or_rule], name, dict(hooks or {}))
    return ChannelRule(role or "custom", role_or_rule, name, dict(hooks or {}))


def register_module(cls: type[nn.Module], rule: RoleOrRule, *, role: str | None = None, leaf: bool = True,
                    hooks: Mapping[str, Hook] | None = None, registry: OpRegistry = REGISTRY) -> None:
    """Give module type `cls` (and its subclasses) a channel rule; `leaf` keeps the tracer out of it.

    `rule` is a role name ("follows", "defines", "couples", "blocks", ...) or a function
    `(ctx: RuleContext, node) -> layout` for anything else.
    """
    registry.modules[cls] = _as_rule(rule, role, cls.__name__, hooks)
    if leaf:
        registry.leaf_modules.add(cls)


def register_function(fn: Any, rule: RoleOrRule, *, role: str | None = None,
                      hooks: Mapping[str, Hook] | None = None, registry: OpRegistry = REGISTRY) -> None:
    """Give a free function (e.g. `torch.cat`, `operator.add`, a `torch.fx.wrap`ped helper) a rule."""
    registry.functions[fn] = _as_rule(rule, role, function_name(fn), hooks)


def register_function_name(qualified_name: str, rule: RoleOrRule, *, role: str | None = None,
                           registry: OpRegistry = REGISTRY) -> None:
    """Give a function a rule by its qualified name (`torchvision.ops.stochastic_depth.stochastic_depth`),
    for functions of packages duccio-fx does not import."""
    registry.function_names[qualified_name] = _as_rule(rule, role, qualified_name, None)


def register_method(name: str, rule: RoleOrRule, *, role: str | None = None,
                    hooks: Mapping[str, Hook] | None = None, registry: OpRegistry = REGISTRY) -> None:
    """Give a tensor method (`x.view(...)` → "view") a rule."""
    registry.methods[name] = _as_rule(rule, role, f"Tensor.{name}", hooks)


def add_hook(op: type | str | Any, kind: str, hook: Hook, registry: OpRegistry = REGISTRY) -> None:
    """Attach a `kind` hook to an op already in the registry: a module class, a tensor method's name or a
    function (a lowering backend adds its hooks this way)."""
    table: dict[Any, ChannelRule] = registry.modules if isinstance(op, type) else \
        registry.methods if isinstance(op, str) else registry.functions
    if op not in table:
        raise KeyError(f"{op!r} is not in the op registry; register its channel rule first")
    table[op] = replace(table[op], hooks={**table[op].hooks, kind: hook})


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
