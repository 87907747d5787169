"""Built-in channel rules and their registration for torch's modules, functions and tensor methods.

A rule reads its inputs' layouts through a `RuleContext`, records constraints (couple, consume, freeze)
and returns the layout of the node's output. Rules decide from recorded shapes, not from guesses: after a
rule runs, the analysis checks that every returned layout is as wide as the tensor it describes.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from duccio_fx.channels import ChannelSolver, RawLayout
from duccio_fx.meta import TensorInfo, ValueInfo, tensor_info
from duccio_fx.registry import REGISTRY, OpRegistry, describe_target, register_function, register_method, \
    register_module

RawValue = Any  # RawLayout | tuple[RawValue, ...] | None


class RuleContext:
    """What a rule may read and record while the channel analysis walks the graph."""

    def __init__(self, gm: GraphModule, solver: ChannelSolver, registry: OpRegistry) -> None:
        self.gm = gm
        self.solver = solver
        self.registry = registry
        self.layouts: dict[Node, RawValue] = {}
        self.roles: dict[Node, str] = {}

    # -- reading -----------------------------------------------------------------------------------
    def layout(self, value: Any) -> RawValue:
        return self.layouts.get(value) if isinstance(value, Node) else None

    @staticmethod
    def info(value: Any) -> ValueInfo:
        return tensor_info(value) if isinstance(value, Node) else None

    def module(self, node: Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def owner(self, node: Node) -> str:
        """Qualified module name for module calls, the node name otherwise."""
        return str(node.target) if node.op == "call_module" else node.name

    def where(self, node: Node) -> str:
        return f"{describe_target(self.gm, node)} at node '{node.name}'"

    @staticmethod
    def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
        if len(node.args) > index:
            return node.args[index]
        return node.kwargs.get(name, default)

    # -- recording ---------------------------------------------------------------------------------
    def set_role(self, node: Node, role: str) -> None:
        self.roles[node] = role

    def new_space(self, node: Node, size: int, dim: int, kind: str = "producer",
                  frozen: str | None = None) -> RawLayout:
        seg = self.solver.new_space(size, node.name, self.owner(node), kind, frozen)
        return RawLayout(dim, (seg,))

    def couple(self, a: RawLayout, b: RawLayout, node: Node) -> None:
        why = self.solver.couple(a, b)
        if why is not None:
            reason = f"{self.where(node)} combines tensors whose channels cannot be matched: {why}"
            self.solver.freeze(a, reason)
            self.solver.freeze(b, reason)

    def freeze(self, value: RawValue, reason: str) -> None:
        for layout in iter_layouts(value):
            self.solver.freeze(layout, reason)

    def consume(self, layout: RawValue, node: Node) -> None:
        for lay in iter_layouts(layout):
            self.solver.consume(lay, self.owner(node))

    def opaque(self, node: Node, reason: str, info: ValueInfo = None) -> RawValue:
        """Fresh frozen channel spaces for every tensor the node outputs (dim 1, the usual channel dim)."""
        info = tensor_info(node) if info is None else info
        if isinstance(info, TensorInfo):
            if len(info.shape) < 2:
                return None
            return self.new_space(node, info.shape[1], 1, kind="opaque", frozen=reason)
        if isinstance(info, tuple):
            return tuple(self.opaque(node, reason, i) for i in info)
        return None

    def block(self, node: Node, why: str) -> RawValue:
        """The node uses channels in a way the search cannot follow: freeze what it touches, in and out."""
        self.set_role(node, "blocks")
        reason = f"{self.where(node)} {why}"
        for arg in iter_nodes((node.args, node.kwargs)):
            self.freeze(self.layout(arg), reason)
        return self.opaque(node, reason)


def iter_layouts(value: RawValue) -> Iterator[RawLayout]:
    if isinstance(value, RawLayout):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_layouts(v)


def iter_nodes(value: Any) -> Iterator[Node]:
    if isinstance(value, Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_nodes(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_nodes(v)


def first_layout(ctx: RuleContext, node: Node) -> RawLayout | None:
    lay = ctx.layout(node.args[0]) if node.args else None
    return lay if isinstance(lay, RawLayout) else None


def out_shape(node: Node) -> tuple[int, ...] | None:
    info = tensor_info(node)
    return info.shape if isinstance(info, TensorInfo) else None


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim


# --------------------------------------------------------------------------------------------------
# role rules
# --------------------------------------------------------------------------------------------------
def rule_no_channels(ctx: RuleContext, node: Node) -> RawValue:
    """Sizes, shapes, dims: the result carries no channels."""
    ctx.set_role(node, "no-channels")
    return None


def rule_follows(ctx: RuleContext, node: Node) -> RawValue:
    """Output channel i is input channel i (activations, dropout, pooling, padding, upsampling)."""
    ctx.set_role(node, "follows")
    return first_layout(ctx, node)


def rule_follows_with_params(ctx: RuleContext, node: Node) -> RawValue:
    """Per-channel op that owns per-channel parameters (BatchNorm, affine InstanceNorm, PReLU)."""
    lay = first_layout(ctx, node)
    if lay is not None and lay.dim != 1:
        return ctx.block(node, f"normalises dim 1, but the channels are on dim {lay.dim}")
    module = ctx.module(node)
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if any(t.numel() > 1 for t in tensors):  # per-channel weights or statistics get sliced on export
        ctx.consume(lay, node)
    ctx.set_role(node, "follows")
    return lay


def rule_conv(ctx: RuleContext, node: Node) -> RawValue:
    """Convolutions: plain ones define channels, depthwise ones follow, grouped ones are frozen."""
    conv = ctx.module(node)
    assert isinstance(conv, nn.modules.conv._ConvNd)
    lay = first_layout(ctx, node)
    if lay is not None and lay.dim != 1:
        return ctx.block(node, f"expects channels on dim 1, but they are on dim {lay.dim}")
    cin, cout, groups = conv.in_channels, conv.out_channels, conv.groups
    if groups == 1:
        ctx.set_role(node, "defines")
        ctx.consume(lay, node)
        return ctx.new_space(node, cout, 1)
    if groups == cin and cout % cin == 0 and (not conv.transposed or cout == cin):
        ctx.set_role(node, "depthwise")
        ctx.consume(lay, node)
        if lay is None:
            return ctx.new_space(node, cout, 1, kind="opaque", frozen=f"{ctx.where(node)} reads an untracked tensor")
        return lay if cout == cin else lay.repeat_each(cout // cin)
    ctx.set_role(node, "grouped")
    reason = (f"grouped convolution {ctx.where(node)} (groups={groups}): duccio-fx keeps grouped "
              f"convolutions at full width (removing channels evenly per group is not supported)")
    ctx.freeze(lay, reason)
    return ctx.new_space(node, cout, 1, kind="producer", frozen=reason)


def rule_linear(ctx: RuleContext, node: Node) -> RawValue:
    """Linear layers define output features on the last dim; input features follow their producer."""
    lay = first_layout(ctx, node)
    shape = out_shape(node)
    assert shape is not None
    last = len(shape) - 1
    if lay is not None and lay.dim != last:
        return ctx.block(node, f"multiplies the last dim, but the channels are on dim {lay.dim}")
    ctx.set_role(node, "defines")
    ctx.consume(lay, node)
    return ctx.new_space(node, shape[-1], last)


def rule_couples(ctx: RuleContext, node: Node) -> RawValue:
    """Element-wise n-ary ops (add, mul, where, max, ...): operands that broadcast over the channel dim
    (size 1 there) impose nothing; the others must keep the same channel set, so they are coupled."""
    shape = out_shape(node)
    if shape is None:
        return None
    nd = len(shape)
    laid: list[tuple[Node, RawLayout]] = []
    untracked: list[tuple[Node, TensorInfo]] = []
    for arg in iter_nodes((node.args, node.kwargs)):
        info = ctx.info(arg)
        if not isinstance(info, TensorInfo):
            continue
        lay = ctx.layout(arg)
        shift = nd - len(info.shape)
        if isinstance(lay, RawLayout):
            laid.append((arg, lay.with_dim(lay.dim + shift)))
        else:
            untracked.append((arg, info))
    ctx.set_role(node, "couples")
    if not laid:
        return None
    dims = {lay.dim for _, lay in laid if lay.width == shape[lay.dim] and lay.width > 1}
    if len(dims) > 1:
        return ctx.block(node, "combines tensors whose channels lie on different dims")
    full = [lay for _, lay in laid if lay.width == shape[lay.dim]]
    if not full:
        return ctx.block(node, "broadcasts a single channel into many")
    ref = full[0]
    for lay in full[1:]:
        ctx.couple(ref, lay, node)
    for arg, info in untracked:
        k = ref.dim - (nd - len(info.shape))
        if 0 <= k < len(info.shape) and info.shape[k] > 1:
            ctx.freeze(ref, f"{ctx.where(node)} combines the channels with '{arg.name}', a tensor of shape "
                            f"{list(info.shape)} that duccio-fx does not resize (a constant or parameter)")
    return ref


def _sequence(ctx: RuleContext, value: Any) -> list[tuple[str, ValueInfo, RawValue]]:
    """(name, info, layout) of each tensor in a list argument, which may itself be one tuple-valued node."""
    if isinstance(value, Node):
        infos, lays = ctx.info(value), ctx.layout(value)
        if isinstance(infos, tuple):
            lays = lays if isinstance(lays, tuple) else (None,) * len(infos)
            return [(f"{value.name}[{i}]", info, lay) for i, (info, lay) in enumerate(zip(infos, lays))]
        return [(value.name, infos, lays)]
    return [(getattr(v, "name", str(v)), ctx.info(v), ctx.layout(v)) for v in value]


def rule_concat(ctx: RuleContext, node: Node) -> RawValue:
    """torch.cat: along the channel dim the output is the inputs' channels one after another (with
    offsets); along any other dim the inputs must share their channels."""
    items = _sequence(ctx, ctx.arg(node, 0, "tensors", ()))
    dim = ctx.arg(node, 1, "dim", 0)
    shape = out_shape(node)
    if shape is None:
        return None
    dim = norm_dim(dim, len(shape))
    ctx.set_role(node, "concat")
    known = [lay for _, _, lay in items if isinstance(lay, RawLayout)]
    if not known:
        return None
    if len({lay.dim for lay in known}) > 1:
        return ctx.block(node, "concatenates tensors whose channels lie on different dims")
    if known[0].dim != dim:
        for lay in known[1:]:
            ctx.couple(known[0], lay, node)
        return known[0]
    segments = []
    for name, info, lay in items:
        if not isinstance(lay, RawLayout):
            width = info.shape[dim] if isinstance(info, TensorInfo) else 0
            lay = ctx.new_space(node, width, dim, kind="opaque",
                                frozen=f"{ctx.where(node)} concatenates '{name}', whose channels duccio-fx "
                                       f"does not track")
        segments.extend(lay.segments)
    return RawLayout(dim, tuple(segments))


def rule_stack(ctx: RuleContext, node: Node) -> RawValue:
    """torch.stack adds a new dim: the inputs must share their channels."""
    items = _sequence(ctx, ctx.arg(node, 0, "tensors", ()))
    dim = ctx.arg(node, 1, "dim", 0)
    shape = out_shape(node)
    if shape is None:
        return None
    dim = norm_dim(dim, len(shape))
    known = [lay for _, _, lay in items if isinstance(lay, RawLayout)]
    ctx.set_role(node, "concat")
    if not known:
        return None
    for lay in known[1:]:
        ctx.couple(known[0], lay, node)
    ref = known[0]
    return ref.with_dim(ref.dim + 1 if dim <= ref.dim else ref.dim)


def _slice_channels(ctx: RuleContext, node: Node, lay: RawLayout, start: int, stop: int,
                    new_dim: int) -> RawValue:
    sub = lay.slice(start, stop)
    if sub is None:
        return ctx.block(node, "slices through the middle of a flattened channel")
    ctx.solver.cut(sub)
    return sub.with_dim(new_dim)


def rule_getitem(ctx: RuleContext, node: Node) -> RawValue:
    """`x[...]` on tensors (slices on the channel dim map indices) and on tuples (split/chunk results)."""
    src, idx = node.args[0], node.args[1]
    lay = ctx.layout(src)
    ctx.set_role(node, "slices")
    if isinstance(lay, (tuple, list)):
        return lay[idx] if isinstance(idx, (int, slice)) else ctx.block(node, "indexes a tuple dynamically")
    info = ctx.info(src)
    if not isinstance(lay, RawLayout) or not isinstance(info, TensorInfo):
        return None
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(i, (Node, list, torch.Tensor)) for i in items):
        return ctx.block(node, "indexes with a tensor or list (advanced indexing)")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (len(info.shape) - consumed))
        else:
            expanded.append(i)
    in_dim = out_dim = 0
    for item in expanded:
        if item is None:
            out_dim += 1
            continue
        if in_dim == lay.dim:
            if isinstance(item, int):
                return ctx.block(node, "selects a single channel by index")
            if any(isinstance(v, Node) for v in (item.start, item.stop, item.step)):
                return ctx.block(node, "slices the channels with bounds known only at run time")
            start, stop, step = item.indices(lay.width)
            if step != 1:
                return ctx.block(node, "slices the channels with a step")
            return _slice_channels(ctx, node, lay, start, stop, out_dim)
        in_dim += 1
        out_dim += 0 if isinstance(item, int) else 1
    return lay.with_dim(out_dim + (lay.dim - in_dim))


def _split_like(ctx: RuleContext, node: Node, dim: int) -> RawValue:
    """Shared by split / chunk / tensor_split: read the pieces' widths from the recorded output shapes."""
    lay = first_layout(ctx, node)
    infos = tensor_info(node)
    ctx.set_role(node, "slices")
    if lay is None or not isinstance(infos, tuple):
        return None
    ndim = len(infos[0].shape) if infos and isinstance(infos[0], TensorInfo) else 0
    dim = norm_dim(dim, ndim)
    if dim != lay.dim:
        return tuple(lay for _ in infos)
    pieces, pos = [], 0
    for info in infos:
        assert isinstance(info, TensorInfo)
        piece = lay.slice(pos, pos + info.shape[dim])
        if piece is None:
            return ctx.block(node, "splits through the middle of a flattened or repeated channel")
        pieces.append(piece.with_dim(dim))
        pos += info.shape[dim]
    for piece in pieces:
        ctx.solver.cut(piece)
    return tuple(pieces)


def rule_split(ctx: RuleContext, node: Node) -> RawValue:
    return _split_like(ctx, node, ctx.arg(node, 2, "dim", 0))


def rule_narrow(ctx: RuleContext, node: Node) -> RawValue:
    lay = first_layout(ctx, node)
    ctx.set_role(node, "slices")
    shape = out_shape(node)
    if lay is None or shape is None:
        return None
    dim = norm_dim(ctx.arg(node, 1, "dim"), len(shape))
    if dim != lay.dim:
        return lay
    start, length = ctx.arg(node, 2, "start"), ctx.arg(node, 3, "length")
    if isinstance(start, Node) or isinstance(length, Node):
        return ctx.block(node, "narrows the channels with bounds known only at run time")
    start = start % lay.width
    return _slice_channels(ctx, node, lay, start, start + length, dim)


def rule_unbind(ctx: RuleContext, node: Node) -> RawValue:
    lay = first_layout(ctx, node)
    ctx.set_role(node, "slices")
    infos = tensor_info(node)
    if lay is None or not isinstance(infos, tuple):
        return None
    ndim = len(infos[0].shape) + 1 if infos and isinstance(infos[0], TensorInfo) else 1
    dim = norm_dim(ctx.arg(node, 1, "dim", 0), ndim)
    if dim == lay.dim:
        return ctx.block(node, "unbinds the channel dim into separate tensors")
    return tuple(lay.with_dim(lay.dim - (dim < lay.dim)) for _ in infos)


def rule_reshape(ctx: RuleContext, node: Node) -> RawValue:
    """view / reshape / flatten / unflatten / squeeze / unsqueeze, decided from the recorded shapes.

    The channel dim survives when some output dim starts at the same flat offset: it keeps its width,
    absorbs trailing dims (each channel then owns a block of features, e.g. flatten before a Linear), or
    splits back into channels (un-flatten). Splitting a channel dim itself (channel shuffle) blocks.
    """
    lay = first_layout(ctx, node)
    src_info = ctx.info(node.args[0]) if node.args else None
    shape = out_shape(node)
    ctx.set_role(node, "reshapes")
    if lay is None or not isinstance(src_info, TensorInfo) or shape is None:
        return None
    ins = src_info.shape
    cd, width = lay.dim, lay.width
    prefix = math.prod(ins[:cd])
    suffix = math.prod(ins[cd + 1:])
    acc = 1
    for j, size in enumerate(shape):
        if acc == prefix and (j >= 1 or cd == 0):
            if size == width:
                return lay.with_dim(j)
            if size > width and size % width == 0 and suffix % (size // width) == 0:
                return lay.repeat_each(size // width).with_dim(j)
            if size < width and size > 0 and width % size == 0:
                shrunk = lay.shrink_block(width // size)
                if shrunk is not None:
                    return shrunk.with_dim(j)
        acc *= size
        if acc > prefix:
            break
    return ctx.block(node, f"reshapes {list(ins)} → {list(shape)} in a way that mixes the channel dim "
                           f"(e.g. a channel shuffle or splitting channels into heads)")


def rule_permute(ctx: RuleContext, node: Node) -> RawValue:
    """permute / transpose / movedim / t: the channel dim moves, channels are untouched."""
    lay = first_layout(ctx, node)
    ctx.set_role(node, "reshapes")
    src_info = ctx.info(node.args[0]) if node.args else None
    if lay is None or not isinstance(src_info, TensorInfo):
        return None
    ndim = len(src_info.shape)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    args = list(node.args[1:])
    if name in ("permute",):
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        dims = dims or list(node.kwargs.get("dims", ()))
        order = [norm_dim(d, ndim) for d in dims]
        return lay.with_dim(order.index(lay.dim))
    if name in ("transpose", "swapaxes", "swapdims"):
        a = norm_dim(ctx.arg(node, 1, "dim0"), ndim)
        b = norm_dim(ctx.arg(node, 2, "dim1"), ndim)
        return lay.with_dim(b if lay.dim == a else a if lay.dim == b else lay.dim)
    if name in ("t",):
        return lay.with_dim(1 - lay.dim) if ndim == 2 else lay
    if name in ("movedim", "moveaxis"):
        src, dst = ctx.arg(node, 1, "source"), ctx.arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        order = [d for d in range(ndim) if d not in [norm_dim(s, ndim) for s in src]]
        for s, d in sorted(zip([norm_dim(s, ndim) for s in src], [norm_dim(d, ndim) for d in dst]),
                           key=lambda p: p[1]):
            order.insert(d, s)
        return lay.with_dim(order.index(lay.dim))
    return ctx.block(node, "moves dims in a way duccio-fx does not know")


def rule_reduce(ctx: RuleContext, node: Node) -> RawValue:
    """mean / sum / amax / ... over dims: fine over spatial dims, blocks when it mixes channels."""
    lay = first_layout(ctx, node)
    ctx.set_role(node, "reduces")
    src_info = ctx.info(node.args[0]) if node.args else None
    if lay is None or not isinstance(src_info, TensorInfo):
        return None
    dim = ctx.arg(node, 1, "dim")
    if isinstance(dim, Node):
        return ctx.block(node, "reduces over dims known only at run time")
    keepdim = bool(ctx.arg(node, 2, "keepdim", False))
    ndim = len(src_info.shape)
    if dim is None:
        return ctx.block(node, "reduces over every dim, channels included")
    dims = {norm_dim(d, ndim) for d in ([dim] if isinstance(dim, int) else dim)}
    if lay.dim in dims:
        return ctx.block(node, "reduces over the channel dim")
    new = lay if keepdim else lay.with_dim(lay.dim - sum(1 for d in dims if d < lay.dim))
    return (new, new) if isinstance(tensor_info(node), tuple) else new


def rule_max_min(ctx: RuleContext, node: Node) -> RawValue:
    """torch.max/min: element-wise with a second tensor, a reduction with a dim."""
    if len(node.args) > 1 and isinstance(node.args[1], Node) or "other" in node.kwargs:
        return rule_couples(ctx, node)
    return rule_reduce(ctx, node)


def _dim_rule(default_dim: int | None, attr: str = "dim") -> Callable[[RuleContext, Node], RawValue]:
    """Ops acting along one dim (softmax, cumsum, normalize): follow unless that dim holds channels."""

    def rule(ctx: RuleContext, node: Node) -> RawValue:
        lay = first_layout(ctx, node)
        shape = out_shape(node)
        ctx.set_role(node, "follows")
        if lay is None or shape is None:
            return lay
        if node.op == "call_module":
            dim = getattr(ctx.module(node), attr, default_dim)
        else:
            dim = ctx.arg(node, 1, attr, default_dim)
        if dim is None or norm_dim(dim, len(shape)) == lay.dim:
            return ctx.block(node, "works across the channels (its dim is the channel dim)")
        return lay

    return rule


def rule_keeps_channels(ctx: RuleContext, node: Node) -> RawValue:
    """pad / expand / repeat / interpolate: follows when the channel dim keeps its size, blocks otherwise."""
    lay = first_layout(ctx, node)
    shape = out_shape(node)
    ctx.set_role(node, "follows")
    if lay is None or shape is None:
        return lay
    new_dim = lay.dim + (len(shape) - len(ctx.info(node.args[0]).shape))  # type: ignore[union-attr]
    if not 0 <= new_dim < len(shape) or shape[new_dim] != lay.width:
        return ctx.block(node, "changes the size of the channel dim (pads, repeats or resizes it)")
    return lay.with_dim(new_dim)


def rule_blocks(ctx: RuleContext, node: Node) -> RawValue:
    """Known ops that mix channels (matmul, attention, layer norm, channel shuffle, functional conv)."""
    return ctx.block(node, "mixes channels in a way the channel search cannot follow")


def rule_input(ctx: RuleContext, node: Node) -> RawValue:
    """Model inputs: their channels are fixed by the data."""
    ctx.set_role(node, "input")
    return ctx.opaque(node, f"model input '{node.name}': the input channels are fixed by the data")


# Roles a user can give their own leaf modules and functions by name; anything else takes a rule function.
ROLE_RULES: dict[str, Callable[[RuleContext, Node], RawValue]] = {
    "follows": rule_follows,
    "couples": rule_couples,
    "reshapes": rule_reshape,
    "reduces": rule_reduce,
    "blocks": rule_blocks,
    "no-channels": rule_no_channels,
}


# --------------------------------------------------------------------------------------------------
# registrations
# --------------------------------------------------------------------------------------------------
def _register_builtins(registry: OpRegistry) -> None:
    def mod(types: tuple[type, ...], rule: Callable[[RuleContext, Node], RawValue], role: str) -> None:
        for cls in types:
            register_module(cls, rule, role=role, leaf=False, registry=registry)

    def fns(targets: tuple[Any, ...], rule: Callable[[RuleContext, Node], RawValue], role: str) -> None:
        for fn in targets:
            register_function(fn, rule, role=role, registry=registry)

    def methods(names: str, rule: Callable[[RuleContext, Node], RawValue], role: str) -> None:
        for name in names.split():
            register_method(name, rule, role=role, registry=registry)

    activations = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                   nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
                   nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Identity,
                   nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
             nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
    pads = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
            nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
            nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
    mod(activations + pools, rule_follows, "follows")
    mod(pads, rule_keeps_channels, "follows")
    mod((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU),
        rule_follows_with_params, "follows")
    mod((nn.modules.conv._ConvNd,), rule_conv, "defines")
    mod((nn.Linear,), rule_linear, "defines")
    mod((nn.Flatten, nn.Unflatten), rule_reshape, "reshapes")
    mod((nn.Softmax, nn.LogSoftmax, nn.Softmin), _dim_rule(None), "follows")
    mod((nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.MultiheadAttention, nn.PixelShuffle,
         nn.PixelUnshuffle, nn.ChannelShuffle, nn.Bilinear, nn.Embedding, nn.RNNBase, nn.Transformer,
         nn.TransformerEncoderLayer, nn.TransformerDecoderLayer), rule_blocks, "blocks")

    unary = (torch.relu, torch.relu_, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
             F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.softsign, F.logsigmoid,
             F.tanhshrink, F.threshold, F.sigmoid, F.tanh, torch.sigmoid, torch.tanh, torch.exp, torch.log,
             torch.abs, torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.erf, torch.clamp, torch.clip,
             torch.clamp_min, torch.clamp_max, torch.sign, torch.floor, torch.ceil, torch.round,
             torch.reciprocal, torch.nan_to_num, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
             F.alpha_dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
             F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
             F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d,
             operator.neg, operator.pos, operator.abs)
    fns(unary, rule_follows, "follows")
    fns((F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear), rule_keeps_channels, "follows")
    fns((F.pad,), rule_keeps_channels, "follows")
    binary = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
              operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.mod,
              torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
              torch.true_divide, torch.pow, torch.where, torch.maximum, torch.minimum, torch.fmax, torch.fmin,
              torch.lerp, torch.addcmul, torch.addcdiv, torch.masked_fill, torch.rsub, torch.atan2,
              operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne, torch.gt, torch.ge,
              torch.lt, torch.le, torch.eq, torch.ne)
    fns(binary, rule_couples, "couples")
    fns((torch.max, torch.min), rule_max_min, "couples")
    fns((torch.cat, torch.concat, torch.concatenate), rule_concat, "concat")
    fns((torch.stack,), rule_stack, "concat")
    fns((operator.getitem,), rule_getitem, "slices")
    fns((torch.split, torch.chunk, torch.tensor_split), rule_split, "slices")
    fns((torch.narrow,), rule_narrow, "slices")
    fns((torch.unbind,), rule_unbind, "slices")
    fns((torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten), rule_reshape,
        "reshapes")
    fns((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
         torch.t), rule_permute, "reshapes")
    fns((torch.mean, torch.sum, torch.amax, torch.amin, torch.prod, torch.std, torch.var, torch.logsumexp,
         torch.norm, torch.nansum, torch.nanmean), rule_reduce, "reduces")
    fns((torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.softmin, torch.cumsum, torch.cumprod),
        _dim_rule(None), "follows")
    fns((F.normalize,), _dim_rule(1), "follows")
    fns((F.glu,), _dim_rule(-1), "follows")
    fns((getattr, len, torch.numel), rule_no_channels, "no-channels")
    fns((torch.matmul, torch.bmm, torch.mm, torch.einsum, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
         F.conv_transpose2d, F.linear, F.bilinear, F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
         F.embedding, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, F.scaled_dot_product_attention,
         torch.roll, torch.flip, torch.gather, torch.index_select, torch.sort, torch.topk, torch.argmax,
         torch.argmin), rule_blocks, "blocks")

    methods("relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ log abs abs_ neg neg_ sqrt rsqrt square clamp "
            "clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ sign floor ceil round reciprocal "
            "contiguous clone detach to float double half bfloat16 type type_as cpu cuda requires_grad_ "
            "nan_to_num hardswish", rule_follows, "follows")
    methods("add sub mul div true_divide floor_divide pow add_ sub_ mul_ div_ pow_ maximum minimum "
            "masked_fill masked_fill_ lerp where addcmul addcdiv rsub gt ge lt le eq ne", rule_couples, "couples")
    methods("max min", rule_max_min, "couples")
    methods("view reshape flatten unflatten squeeze unsqueeze squeeze_ unsqueeze_ view_as reshape_as",
            rule_reshape, "reshapes")
    methods("permute transpose swapaxes swapdims movedim moveaxis t", rule_permute, "reshapes")
    methods("split chunk tensor_split", rule_split, "slices")
    methods("narrow", rule_narrow, "slices")
    methods("unbind", rule_unbind, "slices")
    methods("mean sum amax amin prod std var logsumexp norm nansum nanmean", rule_reduce, "reduces")
    methods("softmax log_softmax cumsum cumprod", _dim_rule(None), "follows")
    methods("expand expand_as repeat", rule_keeps_channels, "follows")
    methods("size dim numel nelement stride", rule_no_channels, "no-channels")
    methods("matmul bmm mm roll flip gather index_select sort topk argmax argmin", rule_blocks, "blocks")


_register_builtins(REGISTRY)
