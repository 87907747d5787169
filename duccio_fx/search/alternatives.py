"""Alternatives of the path method: builders by name, and which layers get which alternatives.

A builder turns the description of one seed block (conv + its BatchNorm + its activation) into a module
with the same input and output shapes, or raises `NotApplicable` with the reason. Built in (paper's set
first): `conv3`, `conv5`, `dwsep3` (depthwise 3x3 + BN + act, pointwise 1x1 + BN + act), `identity`
(stride 1, as many input as output channels), and `conv1`, `conv7`, `dwsep5`. A new one is

    @duccio_fx.register_alternative("dwsep7")
    def dwsep7(block: BlockSpec) -> nn.Module: ...

Padding follows the seed: an alternative with kernel k gets padding p_seed + (k - k_seed) / 2, so its output
has the seed's shape whatever the seed's padding was.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

from duccio_fx.common.errors import DuccioError

DEFAULT = ("conv3", "conv5", "dwsep3", "identity")
NONE = "none"  # a rule's alternatives "none": keep the matched layers as they are


class NotApplicable(Exception):
    """An alternative that cannot replace this block (the message says why)."""


@dataclass(frozen=True)
class BlockSpec:
    """One seed block the pass may replace: a conv, its BatchNorm and its activation (modules, or None)."""

    name: str  # the seed conv's qualified name: the choice point's name
    conv: nn.Module
    bn: nn.Module | None
    act: nn.Module | None
    in_shape: tuple[int, ...]  # batch dim first
    out_shape: tuple[int, ...]

    @property
    def dims(self) -> int:
        return len(self.in_shape) - 2

    @property
    def in_channels(self) -> int:
        return self.in_shape[1]

    @property
    def out_channels(self) -> int:
        return self.out_shape[1]

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(self.conv.stride)

    def padding_for(self, kernel: int) -> tuple[int, ...]:
        """Padding that gives a kernel-`kernel` conv the seed conv's output shape."""
        pads = []
        for k_seed, p_seed in zip(self.conv.kernel_size, _padding(self.conv)):
            if (kernel - k_seed) % 2:
                raise NotApplicable(f"a {kernel}-wide kernel cannot keep the output shape of the seed's {k_seed}-wide "
                                    "one (their difference is odd)")
            p = p_seed + (kernel - k_seed) // 2
            if p < 0:
                raise NotApplicable(f"a {kernel}-wide kernel would need negative padding")
            pads.append(p)
        return tuple(pads)

    def seed_name(self) -> str:
        """The name the seed block itself goes by among the alternatives (`conv3` for a 'same' 3x3 conv)."""
        ks = set(self.conv.kernel_size)
        if len(ks) == 1:
            k = ks.pop()
            try:
                if self.padding_for(k) == _padding(self.conv):
                    return f"conv{k}"
            except NotApplicable:
                pass
        return "seed"

    def conv_module(self, cin: int, cout: int, kernel: int, stride: tuple[int, ...], groups: int = 1,
                    bias: bool | None = None) -> nn.Module:
        cls = {1: nn.Conv1d, 2: nn.Conv2d}[self.dims]
        padding = self.padding_for(kernel)
        has_bias = (self.conv.bias is not None) if bias is None else bias
        return cls(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=has_bias)

    def norm(self, channels: int) -> nn.Module | None:
        """A fresh BatchNorm like the seed's, for `channels` channels (None when the seed has none)."""
        if self.bn is None:
            return None
        bn = self.bn
        return type(bn)(channels, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                        track_running_stats=bn.track_running_stats)

    def activation(self) -> nn.Module | None:
        return copy.deepcopy(self.act) if self.act is not None else None


def sequential(**parts: nn.Module | None) -> nn.Sequential:
    """nn.Sequential with named parts, skipping the None ones."""
    return nn.Sequential(OrderedDict((k, v) for k, v in parts.items() if v is not None))


def seed_block(block: BlockSpec) -> nn.Module:
    """The seed's own block: its conv and BatchNorm modules themselves (trained weights and statistics, not
    copies, so the seed alternative owns them and other uses of their tensors stay the same tensors)."""
    return sequential(conv=block.conv, bn=block.bn, act=block.activation())


Builder = Callable[[BlockSpec], nn.Module]
BUILDERS: dict[str, Builder] = {}


def register_alternative(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make `builder(block) -> nn.Module` the alternative `name` (raise NotApplicable to skip)."""
    if not name.isidentifier() or name == NONE:
        raise ValueError(f"an alternative's name must be an identifier other than {NONE!r}, got {name!r}")

    def add(builder: Builder) -> Builder:
        BUILDERS[name] = builder
        return builder
    return add


def alternative_names() -> list[str]:
    return list(BUILDERS)


def _conv(kernel: int) -> Builder:
    def build(block: BlockSpec) -> nn.Module:
        if block.seed_name() == f"conv{kernel}":
            return copy.deepcopy(seed_block(block))  # a second copy of the seed's block, not the seed's own
        conv = block.conv_module(block.in_channels, block.out_channels, kernel, block.stride)
        return sequential(conv=conv, bn=block.norm(block.out_channels), act=block.activation())
    return build


def _dwsep(kernel: int) -> Builder:
    def build(block: BlockSpec) -> nn.Module:
        cin, cout = block.in_channels, block.out_channels
        has_bn = block.bn is not None
        dw = block.conv_module(cin, cin, kernel, block.stride, groups=cin, bias=not has_bn)
        ones = tuple(1 for _ in block.stride)
        pw_cls = {1: nn.Conv1d, 2: nn.Conv2d}[block.dims]
        pw = pw_cls(cin, cout, 1, stride=ones, bias=block.conv.bias is not None)
        return sequential(dw=dw, dw_bn=block.norm(cin), dw_act=block.activation(), pw=pw, pw_bn=block.norm(cout),
                          pw_act=block.activation())
    return build


for _k in (1, 3, 5, 7):
    register_alternative(f"conv{_k}")(_conv(_k))
for _k in (3, 5):
    register_alternative(f"dwsep{_k}")(_dwsep(_k))


@register_alternative("identity")
def identity(block: BlockSpec) -> nn.Module:
    if any(s != 1 for s in block.stride):
        raise NotApplicable(f"identity needs stride 1 (the block has stride {block.stride})")
    if block.in_shape[1:] != block.out_shape[1:]:
        raise NotApplicable(f"identity needs the output shape to equal the input's ({list(block.in_shape[1:])} -> "
                            f"{list(block.out_shape[1:])})")
    return nn.Identity()


def _padding(conv: nn.Module) -> tuple[int, ...]:
    pad = conv.padding
    if pad == "valid":
        return tuple(0 for _ in conv.kernel_size)
    if pad == "same":
        return tuple((k - 1) // 2 for k in conv.kernel_size)
    return tuple(pad)


@dataclass
class Rule:
    pattern: str | None  # None: the default rule (every layer)
    names: tuple[str, ...]
    text: str
    matched: bool = False


@dataclass
class AlternativeSelection:
    """Which alternatives each layer gets: a default set, then `PATTERN=a,b` rules (the last match wins)."""

    rules: list[Rule] = field(default_factory=lambda: [Rule(None, DEFAULT, ",".join(DEFAULT))])
    explicit: bool = False  # the user chose a default set (else the model's own Choices switch it off)

    @classmethod
    def parse(cls, specs: str | Sequence[str] | None) -> AlternativeSelection:
        """`["conv3,conv5,dwsep3,identity", "layer3.*=conv3,identity", "conv1=none"]` (strings as on the CLI)."""
        if specs is None:
            return cls()
        specs = [specs] if isinstance(specs, str) else list(specs)
        selection = cls()
        for text in specs:
            pattern, _, names_text = text.rpartition("=") if "=" in text else (None, "", text)
            if pattern is not None and not pattern.strip():
                raise DuccioError(f"empty layer pattern in {text!r}", where="--alternatives",
                                  fix="write PATTERN=NAMES, e.g. 'layer3.*=conv3,identity'")
            names = tuple(n.strip() for n in names_text.split(",") if n.strip())
            if not names:
                raise DuccioError(f"no alternative named in {text!r}", where="--alternatives",
                                  fix=f"name some of: {', '.join(alternative_names())} (or 'none')")
            for n in names:
                if n not in BUILDERS and not (n == NONE and len(names) == 1):
                    raise DuccioError(f"unknown alternative {n!r} in {text!r}", where="--alternatives",
                                      fix=f"use names from: {', '.join(alternative_names())}, or 'none' alone to keep "
                                          "layers as they are; register new ones with duccio_fx.register_alternative")
            if pattern is None:
                selection.rules[0] = Rule(None, names, text)
                selection.explicit = True
            else:
                selection.rules.append(Rule(pattern.strip(), names, text))
        return selection

    def for_layer(self, name: str) -> tuple[tuple[str, ...], Rule]:
        """The alternatives of layer `name` and the rule that chose them."""
        chosen = self.rules[0]
        for rule in self.rules[1:]:
            if fnmatch.fnmatchcase(name, rule.pattern or ""):
                rule.matched = True
                chosen = rule
        return chosen.names, chosen

    def check_all_matched(self) -> None:
        """Every pattern must name at least one layer: a typo would otherwise silently change nothing."""
        for rule in self.rules[1:]:
            if not rule.matched:
                raise DuccioError(f"the pattern {rule.pattern!r} of --alternatives {rule.text!r} matches no layer "
                                  "the path method can replace", where="--alternatives",
                                  fix="use names as listed by `duccio-fx inspect MODEL --method path` (shell-style "
                                      "wildcards, e.g. 'layer3.*')")

    def describe(self) -> str:
        return "; ".join(r.text for r in self.rules)
