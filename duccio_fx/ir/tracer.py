"""Tracer: a user's `nn.Module` → IR (`torch.fx.GraphModule`); shapes come from the shape-propagation pass.

Failures of torch.fx become a `DuccioTraceError` naming the module path and the source line, with a fix.
Tracing runs the model's Python with proxies, and a module that caches a tensor during forward (timm's
LeViT and EfficientFormer keep attention biases in a dict) would keep a proxy there, breaking the user's
next forward or trace. So the tracer follows a copy of the module tree that shares the parameters and
buffers, and puts the buffers' values back afterwards: the user's model is never changed, and nothing large
is copied. The copy is traced in eval mode, so Python branches on `self.training` (timm's drop path) and the
`training=` of a functional batch norm take their inference form; `functional-layers` gives batch norms
their train/eval behaviour back as modules.
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Tracer

from duccio_fx.common.errors import DuccioError, DuccioTraceError
from duccio_fx.ir.meta import MODEL_KEY, model_name, source_line
from duccio_fx.ir.registry import REGISTRY, OpRegistry

LeafSpec = type | str  # a module class, or the qualified name of one submodule

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the duccio_fx package


class _DuccioTracer(Tracer):
    """fx tracer that honours leaf modules (given and registered) and remembers where tracing failed."""

    def __init__(self, leaf_modules: Iterable[LeafSpec] = (), registry: OpRegistry = REGISTRY,
                 record_stack_traces: bool = False) -> None:  # defaults: unpickling re-creates the tracer
        super().__init__()
        self.record_stack_traces = record_stack_traces  # costly (about 3x the trace): only to locate errors
        specs = list(leaf_modules)
        self.leaf_types = tuple(s for s in specs if isinstance(s, type))
        self.leaf_names = {s for s in specs if isinstance(s, str)}
        self.registry = registry
        self.failed_module: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types) or self.registry.is_leaf(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:
                try:
                    self.failed_module = self.path_of_module(m)
                except NameError:
                    self.failed_module = type(m).__name__
            raise


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code (not torch, not duccio-fx)."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and not path.startswith(_OWN_DIR) \
                and "<eval_with_key>" not in frame.filename:
            return frame
    return None


def symbolic_trace(model: nn.Module, leaf_modules: Sequence[LeafSpec] = (),
                   registry: OpRegistry = REGISTRY, record_stack_traces: bool = False) -> GraphModule:
    """Trace `model` into a GraphModule (no shapes yet). Leaf modules stay as single call_module nodes."""
    if not isinstance(model, nn.Module):
        raise DuccioTraceError(f"expected a torch.nn.Module, got {type(model).__name__}",
                               fix="pass the model object (an nn.Module instance), not its class or output")
    tracer = _DuccioTracer(leaf_modules, registry, record_stack_traces)
    buffers = [(b, b.clone()) for b in model.buffers()]
    model = _sharing_copy(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()  # `if self.training:` branches and F.batch_norm's `training=` take their inference form
    try:
        graph = tracer.trace(model)
    except Exception as err:
        module = tracer.failed_module
        frame = _user_frame(err)
        where = []
        if module is not None:
            where.append(f"module '{module or '<root>'}'")
        if frame is not None:
            where.append(f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}")
        culprit = f"'{module}'" if module else "the module that contains this line"
        raise DuccioTraceError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}",
            where=", ".join(where) or None,
            fix=(f"if {culprit} has data-dependent control flow or Python torch.fx cannot follow, make it a "
                 f"leaf: duccio_fx.trace(model, inputs, leaf_modules=[<its class or qualified name>]) (in a "
                 f"model file: LEAF_MODULES = [...]) and register its channel rule with "
                 f"duccio_fx.register_module; otherwise rewrite the line without branching on tensor values"),
        ) from err
    finally:
        for m, training in modes.items():  # each module's own mode again (on the copy, or on a model that
            m.training = training           # could not be copied)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    for node in graph.nodes:
        if isinstance(node.type, str):  # `from __future__ import annotations`: fx cannot pickle string types
            node.type = None
    name = model_name(model) if isinstance(model, GraphModule) else type(model).__name__
    gm = GraphModule(tracer.root, graph, name)
    gm.meta[MODEL_KEY] = name
    return gm


def _sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the model's own objects. Each module gets
    its own attribute dict, with its containers (dicts, lists, sets: caches) copied one level deep, so what
    tracing writes into a module stays in the copy. Much cheaper than `copy.deepcopy`, which pickles."""
    copies: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in copies:  # a module reachable twice stays one module
            return copies[id(module)]
        new = object.__new__(module.__class__)  # not cls.__new__: GraphModule's makes a class without forward
        copies[id(module)] = new
        state = {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in module.__dict__.items()}
        state["_modules"] = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        new.__dict__.update(state)
        return new

    try:
        return clone(model)
    except Exception:  # a class or container that cannot be copied this way: trace the model itself
        return model


def as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


@contextmanager
def locate_errors(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> Iterator[None]:
    """Add the user's source line to errors about a node: traces again, with stack traces, only on failure."""
    try:
        yield
    except DuccioError as err:
        if err.node is not None:
            try:
                gm = symbolic_trace(model, leaf_modules, record_stack_traces=True)
                node = next((n for n in gm.graph.nodes if n.name == err.node), None)
                line = source_line(node) if node is not None else ""
            except DuccioError:
                line = ""
            if line:
                raise err.locate(line, prepend=False)
        raise
