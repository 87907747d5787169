"""fold-batchnorm: merge each BatchNorm into the conv or linear layer that feeds it (evaluation statistics).

DORY has no BatchNorm layer: a conv's requantization carries the per-channel scale and shift. Folding is
exact in real arithmetic, `w' = w·γ/σ`, `b' = (b − μ)·γ/σ + β` with `σ = sqrt(var + eps)`, and within float
rounding in practice (tested ≤ 1e-5). Pairs: Conv2d + BatchNorm2d, Conv1d + BatchNorm1d, Linear + BatchNorm1d
on its [N, C] output. The folded layer is a new module in the graph module's own module tree (tracing copies
that tree), so the traced model keeps its BatchNorm.

The pass never changes what the graph computes:

* A conv or linear module called more than once (weight sharing) is folded into a copy per folded call
  (`<name>_folded`, `<name>_folded_1`, ...): folding into the shared module would change its other calls. Each
  DORY layer has its own weights anyway, so the copies cost nothing on the board. The same BatchNorm module
  after two convs folds into each of them.
* A BatchNorm subclass whose forward is not BatchNorm's own (kept opaque as a leaf module, e.g. timm's
  `BatchNormAct2d`, which also applies dropout and an activation) is folded only where its forward is known
  exactly: for timm's `BatchNormAct2d` the BatchNorm part folds and its `drop` and `act` submodules stay as
  calls after the layer, `<bn>_drop` and `<bn>_act` (checked numerically on the recorded shape). Any other such subclass is refused,
  naming the node and the module.
* A BatchNorm without running statistics (`track_running_stats=False`) normalises by each batch's own
  statistics even in evaluation, so it has no fixed scale and shift: refused.

A BatchNorm whose input is not a conv/linear used only by it stays, and `dory-layers` reports it.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.common.errors import DuccioError
from duccio_fx.ir.meta import TensorInfo, tensor_info
from duccio_fx.ir.module_tree import fresh_name
from duccio_fx.ir.pass_manager import Pass
from duccio_fx.passes.remove_noops import is_plain_identity

_BatchNorm = nn.modules.batchnorm._BatchNorm
# (layer, norm, rank of the layer's output): the pairs whose BatchNorm normalises the layer's output channels
_PAIRS: tuple[tuple[type[nn.Module], type[nn.Module], int], ...] = (
    (nn.Conv2d, nn.BatchNorm2d, 4), (nn.Conv1d, nn.BatchNorm1d, 3), (nn.Linear, nn.BatchNorm1d, 2))

# BatchNorm subclasses whose forward is known exactly: the BatchNorm (evaluation statistics), then these
# submodules in order. Keyed by the forward function's module and qualified name.
KNOWN_FORWARDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("timm.layers.norm_act", "BatchNormAct2d.forward"): ("drop", "act"),
}
FOLDED_FROM = "duccio_folded_from"  # node meta: the module a per-call folded copy was made from


def _module(gm: GraphModule, node: object) -> nn.Module | None:
    if isinstance(node, Node) and node.op == "call_module":
        return gm.get_submodule(str(node.target))
    return None


def _err(node: Node, what: str, fix: str) -> DuccioError:
    return DuccioError(what, where=f"node '{node.name}' (module '{node.target}')", fix=fix, node=node.name)


def extra_modules(bn: _BatchNorm) -> tuple[str, ...] | None:
    """What `bn`'s forward computes after the normalisation, as submodule names in order: () for BatchNorm's own
    forward, the names for a known subclass (`KNOWN_FORWARDS`), None when its forward is unknown."""
    forward = type(bn).forward
    if forward is _BatchNorm.forward:
        return ()
    names = KNOWN_FORWARDS.get((getattr(forward, "__module__", ""), getattr(forward, "__qualname__", "")))
    if names is None or not all(isinstance(getattr(bn, n, None), nn.Module) for n in names):
        return None
    return names


def fold(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of `layer` (conv or linear) that computes `bn(layer(x))` with evaluation statistics."""
    if bn.running_mean is None or bn.running_var is None:
        raise DuccioError("a BatchNorm without running statistics (track_running_stats=False) normalises by each "
                          "batch's own statistics, even in evaluation: it has no fixed scale and shift to fold",
                          fix="train the model with track_running_stats=True (nn.BatchNorm's default)")
    folded = copy.deepcopy(layer)
    with torch.no_grad():
        mean, var = bn.running_mean, bn.running_var
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma.double() / torch.sqrt(var.double() + bn.eps)
        weight = folded.weight.double() * scale.reshape(-1, *([1] * (folded.weight.dim() - 1)))
        bias = folded.bias.double() if folded.bias is not None else torch.zeros_like(mean, dtype=torch.float64)
        new_bias = (bias - mean.double()) * scale + beta.double()
        folded.weight = nn.Parameter(weight.to(folded.weight.dtype))
        folded.bias = nn.Parameter(new_bias.to(folded.weight.dtype))
    return folded


@dataclass
class FoldBatchNorm(Pass):
    """Replaces every conv/linear → BatchNorm pair by one folded layer (see the module's docstring)."""

    name = "fold-batchnorm"
    requires = ("shape-propagation",)

    def run(self, gm: GraphModule) -> bool:
        changed = False
        calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        for node in list(gm.graph.nodes):
            bn = _module(gm, node)
            if not isinstance(bn, _BatchNorm) or len(node.args) != 1 or node.kwargs:
                continue
            producer = node.args[0]
            layer = _module(gm, producer)
            if layer is None or not self._pairs(layer, bn, producer) or len(producer.users) != 1:
                continue
            extra = extra_modules(bn)
            if extra is None:
                raise _err(node, f"module {type(bn).__name__} ('{node.target}') is a BatchNorm whose forward is not "
                                 "BatchNorm's own (it may apply an activation or more after the normalisation): "
                                 "folding it as a plain BatchNorm would drop the rest of its forward",
                           f"drop {type(bn).__name__} from leaf_modules (LEAF_MODULES in a model file) so the tracer "
                           "sees what its forward computes, or write it as an nn.BatchNorm followed by the "
                           "activation module")
            try:
                folded = fold(layer, bn)
            except DuccioError as err:
                err.node = node.name
                raise err.locate(f"node '{node.name}' (module '{node.target}')") from None
            if extra:
                self._check_known_forward(node, bn, extra)
            target = str(producer.target)
            if calls[target] > 1:  # a shared module: its other calls must keep the unfolded weights
                new = fresh_name(gm, f"{target}_folded")
                gm.add_submodule(new, folded)
                producer.meta.setdefault(FOLDED_FROM, target)
                producer.target = new
            else:
                gm.add_submodule(target, folded)
            out = producer
            for attr in extra:
                if is_plain_identity(getattr(bn, attr)):
                    continue
                # a sibling `<bn>_<attr>`, not `<bn>.<attr>`: the BatchNorm module is the user's object, and
                # deleting it as unused must not reach into it
                name = fresh_name(gm, f"{node.target}_{attr}")
                gm.add_submodule(name, getattr(bn, attr))
                with gm.graph.inserting_after(out):
                    out = gm.graph.call_module(name, (out,))
                out.meta.update(node.meta)  # the same shape, source line and provenance as the BatchNorm's value
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.delete_all_unused_submodules()
        return changed

    @staticmethod
    def _pairs(layer: nn.Module, bn: _BatchNorm, producer: Node) -> bool:
        """`bn` normalises the output channels of `layer`, a conv or linear of a matching rank whose forward is
        torch's own (a subclass with its own forward, e.g. a weight-standardised conv, may not be linear in its
        weights, so scaling them would not scale its output)."""
        info = tensor_info(producer)
        rank = len(info.shape) if isinstance(info, TensorInfo) else None
        channels = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        return any(isinstance(layer, lt) and type(layer).forward is lt.forward and isinstance(bn, nt) and rank == r
                   for lt, nt, r in _PAIRS) and bn.num_features == channels

    @staticmethod
    def _check_known_forward(node: Node, bn: _BatchNorm, extra: tuple[str, ...]) -> None:
        """The known forward still computes BatchNorm then `extra` (a check against a changed library)."""
        info = tensor_info(node)
        if not isinstance(info, TensorInfo):
            return
        shape = (2, *info.shape[1:])
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe = copy.deepcopy(bn).double().eval()
        with torch.no_grad():
            want = probe(x)
            got = nn.functional.batch_norm(x, probe.running_mean, probe.running_var, probe.weight, probe.bias,
                                           False, 0.0, probe.eps)
            for attr in extra:
                got = getattr(probe, attr)(got)
        if not torch.allclose(got, want, rtol=1e-9, atol=1e-9):
            raise _err(node, f"module {type(bn).__name__} ('{node.target}') no longer computes a BatchNorm followed "
                             f"by {', '.join(extra)}, as the folding expects", f"drop {type(bn).__name__} from "
                             "leaf_modules (LEAF_MODULES in a model file) so the tracer sees what its forward computes")
