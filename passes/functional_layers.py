"""functional-layers: functional convs, linears and norms whose weights are model parameters become module calls.

torch.fx traces into every module that is not a torch.nn class, so a `Linear` subclass whose forward calls
`F.linear(x, self.weight, self.bias)` (timm's `Linear`), a BatchNorm subclass that calls `F.batch_norm` and
then an activation (timm's `BatchNormAct2d`) or an attention block that calls `F.linear` on another module's
weight (torchvision's swin) leave a functional call whose weights are `get_attr` nodes. Made module calls
again, they are costed, searched, sliced on export, folded and lowered like every other Conv, Linear and
BatchNorm: one representation for every pass after this one. A traced batch norm had also baked the mode of
the trace into its `training=` argument; as a module it follows `train()` / `eval()` again.

The new module takes the name of the module that owned the weight (`head.fc`, `bn1`) when that module's
weight is all the call reads; otherwise `<owner>.<attribute>_<op>`. It shares the parameter and buffer
objects, so nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.ir.meta import WORK_KEY, TensorInfo, tensor_info
from duccio_fx.ir.module_tree import fresh_name, set_module
from duccio_fx.ir.pass_manager import Pass

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
# argument names by position, and which of them are the layer's tensors (weights, statistics)
_SIGNATURES: dict[Any, tuple[tuple[str, ...], tuple[str, ...]]] = {
    F.linear: (("input", "weight", "bias"), ("weight", "bias")),
    F.conv1d: (_CONV_ARGS, ("weight", "bias")),
    F.conv2d: (_CONV_ARGS, ("weight", "bias")),
    F.conv3d: (_CONV_ARGS, ("weight", "bias")),
    F.batch_norm: (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   ("running_mean", "running_var", "weight", "bias")),
    F.group_norm: (("input", "num_groups", "weight", "bias", "eps"), ("weight", "bias")),
}
_CONVS: dict[Any, type[nn.modules.conv._ConvNd]] = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_NORMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d,
                                                            4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bound(node: Node) -> dict[str, Any]:
    """The call's arguments by name (positional ones named by the op's signature)."""
    names, _ = _SIGNATURES[node.target]
    return {**dict(zip(names, node.args)), **node.kwargs}


def _fetch(gm: GraphModule, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _build_linear(args: dict[str, Any], t: dict[str, torch.Tensor], info: TensorInfo) -> nn.Module | None:
    w = t["weight"]
    if w.dim() != 2:
        return None
    return nn.Linear(w.shape[1], w.shape[0], bias="bias" in t, device="meta")


def _conv_builder(cls: type[nn.modules.conv._ConvNd]) -> Callable[..., nn.Module | None]:
    def build(args: dict[str, Any], t: dict[str, torch.Tensor], info: TensorInfo) -> nn.Module | None:
        w = t["weight"]
        groups = int(args.get("groups", 1))
        if w.dim() != len(info.shape):
            return None
        return cls(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=args.get("stride", 1),
                   padding=args.get("padding", 0), dilation=args.get("dilation", 1), groups=groups,
                   bias="bias" in t, device="meta")
    return build


def _build_batch_norm(args: dict[str, Any], t: dict[str, torch.Tensor], info: TensorInfo) -> nn.Module | None:
    stats = [k for k in ("running_mean", "running_var") if k in t]
    affine = [k for k in ("weight", "bias") if k in t]
    if len(stats) == 1 or len(affine) == 1 or len(info.shape) not in _NORMS or not (stats or affine):
        return None
    channels = t[(stats or affine)[0]].numel()
    momentum = args.get("momentum", 0.1)
    return _NORMS[len(info.shape)](channels, eps=args.get("eps", 1e-5), momentum=momentum, affine=bool(affine),
                                   track_running_stats=bool(stats), device="meta")


def _build_group_norm(args: dict[str, Any], t: dict[str, torch.Tensor], info: TensorInfo) -> nn.Module | None:
    if set(t) != {"weight", "bias"} or len(info.shape) < 2:
        return None
    return nn.GroupNorm(int(args["num_groups"]), t["weight"].numel(), eps=args.get("eps", 1e-5), device="meta")


_BUILDERS: dict[Any, Callable[..., nn.Module | None]] = {
    F.linear: _build_linear, **{fn: _conv_builder(cls) for fn, cls in _CONVS.items()},
    F.batch_norm: _build_batch_norm, F.group_norm: _build_group_norm,
}


@dataclass
class FunctionalLayers(Pass):
    """Needs shapes (the rank picks BatchNorm1d/2d/3d). Result: `converted` (new module name → op)."""

    converted: dict[str, str] = field(default_factory=dict)
    name = "functional-layers"
    requires = ("shape-propagation",)

    def run(self, gm: GraphModule) -> bool:
        changed = False
        made: dict[str, tuple[Any, ...]] = {}  # module name -> what it was made from (a second call reuses it)
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _BUILDERS:
                changed |= self._convert(gm, node, made)
        return changed

    def _convert(self, gm: GraphModule, node: Node, made: dict[str, tuple[Any, ...]]) -> bool:
        args = _bound(node)
        _, tensor_names = _SIGNATURES[node.target]
        attrs = {k: v for k in tensor_names if (v := args.get(k)) is not None}
        settings = {k: v for k, v in args.items() if k != "input" and k not in attrs}
        info = tensor_info(args.get("input")) if isinstance(args.get("input"), Node) else None
        if not isinstance(info, TensorInfo) or not attrs \
                or any(not (isinstance(v, Node) and v.op == "get_attr") for v in attrs.values()) \
                or any(isinstance(v, Node) for v in settings.values()):
            return False  # weights computed in the graph, or settings that are values: stays functional
        tensors = {k: _fetch(gm, str(v.target)) for k, v in attrs.items()}
        if any(not isinstance(x, torch.Tensor) for x in tensors.values()) or any(
                not isinstance(tensors[k], nn.Parameter) for k in ("weight", "bias") if k in tensors):
            return False
        try:
            module = _BUILDERS[node.target](args, tensors, info)
        except (ValueError, TypeError, RuntimeError):  # settings a module cannot hold: stays functional
            return False
        if module is None:
            return False
        for key, tensor in tensors.items():
            setattr(module, key, tensor)  # the very parameter and buffer objects: shared, not copied
        if getattr(module, "num_batches_tracked", None) is not None:  # the owner's counter, or a new one
            anchor_owner = str(attrs["running_mean"].target).rpartition(".")[0]
            counter = getattr(gm.get_submodule(anchor_owner) if anchor_owner else gm, "num_batches_tracked", None)
            module.num_batches_tracked = counter if isinstance(counter, torch.Tensor) else torch.tensor(0)
        if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            return False  # a tensor the call did not give (never expected): leave the call as it is
        module.train(gm.training)  # `training=` of a traced batch norm was the mode of the trace: dropped
        anchor = str(attrs.get("weight", next(iter(attrs.values()))).target)
        recipe = (node.target, tuple(sorted((k, str(v.target)) for k, v in attrs.items())),
                  tuple(sorted((k, repr(v)) for k, v in settings.items() if k != "training")))
        name = next((n for n, r in made.items() if r == recipe), None) or self._place(gm, anchor, attrs, module)
        made[name] = recipe
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (args["input"],))
        call.meta.update({k: v for k, v in node.meta.items() if k != WORK_KEY})  # a module call now: no longer opaque
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr in attrs.values():
            if not attr.users:
                gm.graph.erase_node(attr)
        self.converted[name] = getattr(node.target, "__name__", str(node.target))
        return True

    @staticmethod
    def _place(gm: GraphModule, anchor: str, attrs: dict[str, Node], module: nn.Module) -> str:
        """Where the module goes: in place of the weight's owner when the owner is only a holder of the
        tensors this call reads (what GraphModule builds for a traced-through module), else a new name."""
        owner, _, leaf = anchor.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        called = any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes)
        if owner and type(holder) is nn.Module and not called \
                and all(str(a.target).rpartition(".")[0] == owner for a in attrs.values()):
            for child_name, child in holder.named_children():
                module.add_module(child_name, child)
            for key, p in holder.named_parameters(recurse=False):
                if key not in module._parameters:
                    module.register_parameter(key, p)
            for key, b in holder.named_buffers(recurse=False):
                if key not in module._buffers:
                    module.register_buffer(key, b)
            set_module(gm, owner, module)
            return owner
        name = fresh_name(gm, f"{owner + '.' if owner else ''}{leaf}_{type(module).__name__.lower()}")
        gm.add_submodule(name, module)
        return name
