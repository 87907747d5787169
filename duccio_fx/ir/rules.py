"""The library of channel rules: one function per channel role (README, "What `inspect` shows").

Rules decide from recorded shapes, not from guesses: after a rule runs, the analysis checks that every
returned layout is as wide as the tensor it describes. The roles users may name when they register their
own op (`follows`, `couples`, ...) are registered here; which torch op gets which rule is the table in
`duccio_fx.ir.builtin_rules`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.fx import Node

from duccio_fx.ir.channels import RawLayout
from duccio_fx.ir.meta import TensorInfo, ValueInfo, tensor_info
from duccio_fx.ir.registry import register_role
from duccio_fx.ir.rule_api import RawValue, RuleContext, first_layout, iter_nodes, norm_dim, out_shape

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


def rule_functional_norm(ctx: RuleContext, node: Node) -> RawValue:
    """F.batch_norm / F.instance_norm left functional by functional-layers: without per-channel tensors each
    channel is normalised on its own (follows); per-channel tensors computed in the graph cannot be sliced on
    export, so the channels stay."""
    lay = first_layout(ctx, node)
    if lay is not None and lay.dim != 1:
        return ctx.block(node, f"normalises dim 1, but the channels are on dim {lay.dim}")
    ctx.set_role(node, "follows")
    tensors = [a for a in iter_nodes((node.args[1:], node.kwargs)) if isinstance(ctx.info(a), TensorInfo)]
    if tensors:
        ctx.freeze(lay, f"{ctx.where(node)} normalises with per-channel tensors computed in the graph "
                        f"({', '.join(a.name for a in tensors)}), which the export cannot slice, so its channels stay")
    return lay


def rule_layer_norm(ctx: RuleContext, node: Node) -> RawValue:
    """LayerNorm (module or F.layer_norm) over its last dims. Over the channels, its mean and variance mix
    them: the search-time model would have to renormalise over the kept channels alone to match the pruned
    model, so those channels stay (frozen, with the reason) and the output keeps their layout. Over other
    dims (time, width) each channel is normalised on its own: it follows."""
    lay = first_layout(ctx, node)
    shape = out_shape(node)
    ctx.set_role(node, "follows")
    if lay is None or shape is None:
        return lay
    normalized = ctx.setting(node, "normalized_shape", 1, ())
    normalized = (normalized,) if isinstance(normalized, int) else tuple(normalized)
    if lay.dim >= len(shape) - len(normalized):
        ctx.freeze(lay, f"{ctx.where(node)} normalises over the channels (dims {list(normalized)}): removing "
                        f"a channel changes the mean and variance every other channel is divided by, so its "
                        f"channels stay")
        ctx.consume(lay, node)
    return lay


def rule_group_norm(ctx: RuleContext, node: Node) -> RawValue:
    """GroupNorm on dim 1: one group per channel normalises each alone (follows, weights sliced); larger
    groups share statistics across channels, which stay (frozen) as for LayerNorm."""
    lay = first_layout(ctx, node)
    if lay is not None and lay.dim != 1:
        return ctx.block(node, f"normalises groups of dim 1, but the channels are on dim {lay.dim}")
    ctx.set_role(node, "follows")
    if lay is None:
        return None
    groups = ctx.setting(node, "num_groups", 1)
    ctx.consume(lay, node)
    if groups != lay.width:
        ctx.freeze(lay, f"{ctx.where(node)} normalises {lay.width // max(groups, 1)} channels per group "
                        f"together (num_groups={groups}): removing a channel changes its group's statistics, "
                        f"so its channels stay")
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
        # it mixes another dim (tokens, time): the channels pass through on their dim, and its MACs scale
        # with them, which its cost term does not model, so they stay
        ctx.set_role(node, "follows")
        ctx.freeze(lay, f"{ctx.where(node)} mixes dim {last} (not the channels, on dim {lay.dim}); its "
                        f"work scales with the channels, which it reads at full width")
        return lay
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
        if not (0 <= k < len(info.shape) and info.shape[k] > 1):
            continue
        if _per_channel_attribute(arg, info, k, ref.width):  # a layer scale or per-channel bias: sliced on export
            earlier = ctx.layout(arg)
            if isinstance(earlier, RawLayout):  # the same parameter used twice: the same channels both times
                ctx.couple(earlier, ref, node)
            ctx.layouts[arg] = ref.with_dim(k)
            ctx.consume(ref, arg)
        else:
            ctx.freeze(ref, f"{ctx.where(node)} combines the channels with '{arg.name}', a tensor of shape "
                            f"{list(info.shape)} that duccio-fx does not resize (a constant or parameter)")
    return ref


def _per_channel_attribute(arg: Node, info: TensorInfo, dim: int, width: int) -> bool:
    """A parameter or buffer of the model with one entry per channel on `dim` and size 1 elsewhere."""
    return arg.op == "get_attr" and info.shape[dim] == width and \
        all(size == 1 for j, size in enumerate(info.shape) if j != dim)


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
    split: int | None = None
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
                split = size
        acc *= size
        if acc > prefix:
            break
    if split is not None:
        return ctx.block(node, f"reshapes {list(ins)} → {list(shape)}, splitting the {width} channels into "
                               f"{split} parts of {width // split} (a channel shuffle or attention heads): the "
                               f"pruned model would need the same number kept in every part, and a shuffle "
                               f"would then interleave different channels, so these channels stay")
    return ctx.block(node, f"reshapes {list(ins)} → {list(shape)} in a way that mixes the channel dim")


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


def dim_rule(default_dim: int | None, attr: str = "dim") -> Callable[[RuleContext, Node], RawValue]:
    """Ops acting along one dim (softmax, cumsum, normalize): follow unless that dim holds channels."""

    def rule(ctx: RuleContext, node: Node) -> RawValue:
        lay = first_layout(ctx, node)
        shape = out_shape(node)
        ctx.set_role(node, "follows")
        if lay is None or shape is None:
            return lay
        dim = ctx.setting(node, attr, 1, default_dim)
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


# Roles a user can give their own leaf modules and functions by name; anything else takes a rule function.
for _role, _rule in (("follows", rule_follows), ("couples", rule_couples), ("reshapes", rule_reshape),
                     ("reduces", rule_reduce), ("blocks", rule_blocks), ("no-channels", rule_no_channels)):
    register_role(_role, _rule)
