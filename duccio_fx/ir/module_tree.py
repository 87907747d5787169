"""Edits of a GraphModule's module tree that several passes make: put a module at a dotted name, find a free
name for a new one. (Passes that add or replace modules: functional-layers, fold-batchnorm, shrink-export.)"""

from __future__ import annotations

from torch import nn


def set_module(root: nn.Module, qualname: str, module: nn.Module) -> None:
    """Put `module` at `qualname` (`a.b.c`) in `root`'s tree, replacing what is there."""
    parent, _, leaf = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def fresh_name(root: nn.Module, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first dotted name no module of `root`'s tree has."""
    taken = {name for name, _ in root.named_modules(remove_duplicate=False)}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name
