"""The built-in op table: which channel rule (and which transform hooks) each torch op gets.

Importing this module fills the default registry; `duccio_fx` imports it, so the table is always there.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Node

from duccio_fx.ir.activation_hooks import as_module, copy_module, hardtanh_module
from duccio_fx.ir.registry import (REGISTRY, Hook, OpRegistry, add_hook, register_function,
                                   register_function_name, register_method, register_module)
from duccio_fx.ir.rule_api import RawValue, RuleContext
from duccio_fx.ir.rules import (dim_rule, rule_blocks, rule_concat, rule_conv, rule_couples, rule_follows,
                                rule_follows_with_params, rule_functional_norm, rule_getitem, rule_group_norm, rule_keeps_channels,
                                rule_layer_norm, rule_linear,
                                rule_max_min, rule_narrow, rule_no_channels, rule_permute, rule_reduce,
                                rule_reshape, rule_split, rule_stack, rule_unbind)
from duccio_fx.ir.shrink_hooks import (keep_as_is, shrink_getitem, shrink_layer, shrink_narrow, shrink_shape,
                                       shrink_split)

Rule = Callable[[RuleContext, Node], RawValue]

# --------------------------------------------------------------------------------------------------
# registrations
# --------------------------------------------------------------------------------------------------
def register_builtins(registry: OpRegistry) -> None:
    def mod(types: tuple[type, ...], rule: Rule, role: str, shrink: Hook | None = None,
            activation: Hook | None = None) -> None:
        hooks = {k: h for k, h in (("shrink", shrink), ("activation", activation)) if h is not None}
        for cls in types:
            register_module(cls, rule, role=role, leaf=False, hooks=hooks or None, registry=registry)

    def fns(targets: tuple[Any, ...], rule: Rule, role: str, shrink: Hook | None = None) -> None:
        for fn in targets:
            register_function(fn, rule, role=role, hooks={"shrink": shrink} if shrink else None, registry=registry)

    def methods(names: str, rule: Rule, role: str, shrink: Hook | None = None) -> None:
        for name in names.split():
            register_method(name, rule, role=role, hooks={"shrink": shrink} if shrink else None, registry=registry)

    activations = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                   nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
                   nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink)
    passthrough = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    pools = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
             nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
             nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
    pads = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
            nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
            nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
    # any other module whose channels shrink (e.g. a user's per-channel leaf) has its per-channel tensors sliced
    registry.module_hooks["shrink"] = shrink_layer
    mod(activations, rule_follows, "follows", activation=copy_module)
    mod(passthrough + pools, rule_follows, "follows")
    mod(pads, rule_keeps_channels, "follows")
    mod((nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm),
        rule_follows_with_params, "follows", shrink_layer)
    mod((nn.PReLU,), rule_follows_with_params, "follows", shrink_layer, activation=copy_module)
    mod((nn.modules.conv._ConvNd,), rule_conv, "defines", shrink_layer)
    mod((nn.Linear,), rule_linear, "defines", shrink_layer)
    mod((nn.Flatten, nn.Unflatten), rule_reshape, "reshapes")
    mod((nn.Softmax, nn.LogSoftmax, nn.Softmin), dim_rule(None), "follows")
    mod((nn.LayerNorm,), rule_layer_norm, "follows", keep_as_is)
    mod((nn.GroupNorm,), rule_group_norm, "follows", shrink_layer)
    mod((nn.LocalResponseNorm, nn.MultiheadAttention, nn.PixelShuffle,
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
    # torchvision's residual-branch dropout (torch.fx.wrap-ped): scales whole samples, identity in eval
    register_function_name("torchvision.ops.stochastic_depth.stochastic_depth", rule_follows, role="follows",
                           registry=registry)
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
    fns((operator.getitem,), rule_getitem, "slices", shrink_getitem)
    fns((torch.split, torch.chunk, torch.tensor_split), rule_split, "slices", shrink_split)
    fns((torch.narrow,), rule_narrow, "slices", shrink_narrow)
    fns((torch.unbind,), rule_unbind, "slices")
    fns((torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten), rule_reshape, "reshapes")
    fns((torch.reshape,), rule_reshape, "reshapes", shrink_shape)
    fns((torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis,
         torch.t), rule_permute, "reshapes")
    fns((torch.mean, torch.sum, torch.amax, torch.amin, torch.prod, torch.std, torch.var, torch.logsumexp,
         torch.norm, torch.nansum, torch.nanmean), rule_reduce, "reduces")
    fns((torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.softmin, torch.cumsum, torch.cumprod),
        dim_rule(None), "follows")
    fns((F.normalize,), dim_rule(1), "follows")
    fns((F.layer_norm,), rule_layer_norm, "follows")
    fns((F.glu,), dim_rule(-1), "follows")
    fns((getattr, len, torch.numel, torch._assert), rule_no_channels, "no-channels")
    # what functional-layers left functional: norms on statistics computed in the graph (or none at all)
    fns((F.batch_norm, F.instance_norm), rule_functional_norm, "follows")
    fns((F.group_norm,), rule_group_norm, "follows")
    fns((torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d,
         F.conv_transpose2d, F.linear, F.bilinear, F.embedding, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, F.scaled_dot_product_attention,
         torch.roll, torch.flip, torch.gather, torch.index_select, torch.sort, torch.topk, torch.argmax,
         torch.argmin), rule_blocks, "blocks")

    methods("relu relu_ sigmoid sigmoid_ tanh tanh_ exp exp_ log abs abs_ neg neg_ sqrt rsqrt square clamp "
            "clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip clip_ sign floor ceil round reciprocal "
            "contiguous clone detach to float double half bfloat16 type type_as cpu cuda requires_grad_ "
            "nan_to_num hardswish", rule_follows, "follows")
    methods("add sub mul div true_divide floor_divide pow add_ sub_ mul_ div_ pow_ maximum minimum "
            "masked_fill masked_fill_ lerp where addcmul addcdiv rsub gt ge lt le eq ne", rule_couples, "couples")
    methods("max min", rule_max_min, "couples")
    methods("view reshape", rule_reshape, "reshapes", shrink_shape)
    methods("flatten unflatten squeeze unsqueeze squeeze_ unsqueeze_ view_as reshape_as", rule_reshape, "reshapes")
    methods("permute transpose swapaxes swapdims movedim moveaxis t", rule_permute, "reshapes")
    methods("split chunk tensor_split", rule_split, "slices", shrink_split)
    methods("narrow", rule_narrow, "slices", shrink_narrow)
    methods("unbind", rule_unbind, "slices")
    methods("mean sum amax amin prod std var logsumexp norm nansum nanmean", rule_reduce, "reduces")
    methods("softmax log_softmax cumsum cumprod", dim_rule(None), "follows")
    methods("expand", rule_keeps_channels, "follows", shrink_shape)
    methods("expand_as repeat", rule_keeps_channels, "follows")
    methods("size dim numel nelement stride", rule_no_channels, "no-channels")

    # activation calls a pass can rebuild as modules (supernet insertion copies them into alternatives)
    for op, cls in ((torch.relu, nn.ReLU), (F.relu, nn.ReLU), (F.relu6, nn.ReLU6), (F.silu, nn.SiLU),
                    (F.gelu, nn.GELU), (F.hardswish, nn.Hardswish), (torch.tanh, nn.Tanh), (F.tanh, nn.Tanh),
                    (torch.sigmoid, nn.Sigmoid), (F.sigmoid, nn.Sigmoid), ("relu", nn.ReLU), ("relu_", nn.ReLU),
                    ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh), ("hardswish", nn.Hardswish)):
        add_hook(op, "activation", as_module(cls), registry)
    add_hook(F.hardtanh, "activation", hardtanh_module, registry)
    methods("matmul bmm mm roll flip gather index_select sort topk argmax argmin", rule_blocks, "blocks")


register_builtins(REGISTRY)
