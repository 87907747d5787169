"""The `model.py` contract: how a user hands a model (and, later, data) to the CLI.

A model file is plain Python. It must define

* `model` — an `nn.Module` instance, or `build_model()` returning one;
* `example_input` — a tensor or a tuple of tensors with the batch dim first, or `example_input()`
  returning one.

and may define

* `LEAF_MODULES` — module classes or qualified names torch.fx should not trace into;
* `train_loader()` / `val_loader()` — data for `optimize` (iterables of `(inputs, targets)` batches);
* `loss_fn` / `metric_fn` — default cross-entropy and top-1 accuracy.

`zoo:NAME` instead of a path loads a model of the built-in zoo with a random example input.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from duccio_fx import zoo
from duccio_fx.common.errors import ModelFileError


@dataclass
class ModelSpec:
    """What a model file provides."""

    source: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    leaf_modules: list[Any] = field(default_factory=list)
    namespace: dict[str, Any] = field(default_factory=dict)


def _value(ns: dict[str, Any], name: str, builder: str, source: str) -> Any:
    """`ns[builder]()` if that is a function, else `ns[name]` (called when it is a plain function)."""
    fn = ns.get(builder) if callable(ns.get(builder)) and not isinstance(ns.get(builder), type) else None
    if fn is None and callable(ns.get(name)) and not isinstance(ns.get(name), (nn.Module, type)):
        fn, builder = ns[name], name
    if fn is None:
        return ns.get(name)
    try:
        return fn()
    except Exception as err:
        frame = traceback.extract_tb(err.__traceback__)[-1]
        raise ModelFileError(f"{builder}() raised {type(err).__name__}: {err}",
                             where=f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}",
                             fix=f"fix {builder}() in {source}") from err


def _load_namespace(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}", fix="give the path of a Python file (model.py), "
                                                                   "or zoo:NAME for a built-in model")
    if path.is_dir() or path.suffix != ".py":
        raise ModelFileError(f"not a Python file: {path}", fix="give the path of a .py file that defines `model` "
                                                               "and `example_input`")
    name = f"duccio_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # let the file import its siblings
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise ModelFileError(f"syntax error in the model file: {err.msg}",
                             where=f"{err.filename}:{err.lineno}: {(err.text or '').strip()}") from err
    except Exception as err:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename == str(path)]
        frame = frames[-1] if frames else traceback.extract_tb(err.__traceback__)[-1]
        raise ModelFileError(f"the model file failed to import: {type(err).__name__}: {err}",
                             where=f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}") from err
    finally:
        sys.path.pop(0)
    return vars(module)


def _load_zoo(name: str) -> ModelSpec:
    try:
        model, x = zoo.build(name)
    except KeyError as err:
        raise ModelFileError(f"no zoo model named '{name}'", fix=f"choose one of: {', '.join(zoo.names())}") from err
    return ModelSpec(f"zoo:{name}", model, (x,))


def load_model_file(source: str | Path) -> ModelSpec:
    """Load a model file (or `zoo:NAME`) and check it follows the contract."""
    text = str(source)
    if text.startswith("zoo:"):
        return _load_zoo(text.removeprefix("zoo:"))
    path = Path(source)
    ns = _load_namespace(path)
    model = _value(ns, "model", "build_model", text)
    if model is None:
        raise ModelFileError(f"{path} defines no model",
                             where=str(path),
                             fix="define `model = MyNet()` or a function `build_model()` returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise ModelFileError(f"`model` in {path} is a {type(model).__name__}, not a torch.nn.Module",
                             where=str(path), fix="assign an instance, e.g. `model = MyNet()` (not the class)")
    example = _value(ns, "example_input", "example_input", text)
    if example is None:
        raise ModelFileError(f"{path} defines no example input", where=str(path),
                             fix="define `example_input = torch.randn(1, C, H, W)` (batch dim first), or a "
                                 "function `example_input()` returning a tensor or a tuple of tensors")
    inputs = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    bad = [type(x).__name__ for x in inputs if not isinstance(x, torch.Tensor)]
    if bad:
        raise ModelFileError(f"example_input in {path} must be tensors, got {', '.join(bad)}", where=str(path),
                             fix="use torch tensors with the batch dim first")
    leaves = list(ns.get("LEAF_MODULES", []) or [])
    return ModelSpec(text, model, inputs, leaves, {k: v for k, v in ns.items() if not k.startswith("__")
                                                   and not isinstance(v, types.ModuleType)})
