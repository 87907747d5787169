"""Zero channels where DORY's kernels need a channel count they can step through.

* The residual-add kernel processes 4 values at a time with no remainder loop (pulp-nn-mixed
  `Add/pulp_nn_add_*.c`): (channels × width) must be a multiple of 4, so a searched width such as 50
  channels at 7×7 would leave values uncomputed on the board.
* Sub-byte activations: every pixel's channels fill whole bytes (channels a multiple of 8/bits), and a
  linear layer reading them an input length that is a multiple of 16.
* Sub-byte weights (mixed precision): pulp-nn-mixed reads every output channel's weights from a whole byte
  and DORY packs them with no padding, so a conv's (input channels × kernel) must be a multiple of 8/bits
  (`matmul_u8_u8_i4.c`, `matmul_u8_u4_i2.c`: the leftover loops step by 2 or 4 and never end otherwise); a
  linear layer's input length a multiple of 16; a depthwise conv's channels a multiple of 8/bits.

Rather than refuse such a network, the tensors that share the channel indexing (a "channel class": an add's
inputs and output, and whatever depthwise convs and pools carry it on) get zero channels appended:

* a conv or linear that produces the class gets zero weight rows and k = l = 0, so its new channels are 0;
* depthwise convs in the class get zero filters and k = l = 0; pools and adds map zeros to zeros (their
  rounding offsets are below one step of their shift);
* convs and linears that read the class get zero weight columns, so their outputs do not change.

The network's outputs are unchanged, value for value (tested); the golden files of the padded layers carry the
extra zero channels, as DORY will compute them.
"""

from __future__ import annotations

import numpy as np

from duccio_fx.common.errors import DuccioError
from duccio_fx.lower.int_executor import output_shapes
from duccio_fx.lower.intnet import NETWORK_INPUT, Add, Conv, IntNet, Linear, Pool, Requant


def _find(parent: dict[int, int], x: int) -> int:
    while parent.setdefault(x, x) != x:
        x = parent[x]
    return x


def _carries_class(layer: object) -> bool:
    """Layers whose output channels are their input's (depthwise convs, pools)."""
    return isinstance(layer, Pool) or (isinstance(layer, Conv) and layer.groups > 1)


def _pad_requant(rq: Requant, extra: int) -> Requant:
    zeros = np.zeros(extra, np.int64)
    return Requant(np.concatenate([rq.mul, zeros]), np.concatenate([rq.add, zeros]), rq.shift, rq.out)


def _requirements(net: IntNet, shapes: list[tuple[int, ...]], parent: dict[int, int]
                  ) -> dict[int, list[tuple[int, int, str]]]:
    """Per channel class: (m, q, why) with channels x m to be a multiple of q."""
    need: dict[int, list[tuple[int, int, str]]] = {}
    for i, layer in enumerate(net.layers):
        out_bits = net.out_type(i).bits
        if out_bits < 8:  # sub-byte activations: whole bytes per pixel (pulp-nn-mixed's README, its im2col)
            need.setdefault(_find(parent, i), []).append((1, 8 // out_bits, f"{out_bits}-bit output of '{layer.name}'"))
        in_bits = net.in_type(i).bits
        if isinstance(layer, Linear) and in_bits < 8:  # its leftover loop steps over 8 inputs
            source = net.input_shape if layer.input == NETWORK_INPUT else shapes[layer.input]
            need.setdefault(_find(parent, layer.input), []).append(
                (int(np.prod(source[1:])), 16, f"{in_bits}-bit input of '{layer.name}'"))
        if isinstance(layer, Add):
            need.setdefault(_find(parent, i), []).append((shapes[i][2], 4, f"add '{layer.name}'"))
            continue
        bits = getattr(layer, "weight_bits", 8)
        if bits >= 8:
            continue
        why = f"{bits}-bit weights of '{layer.name}'"
        if isinstance(layer, Conv) and layer.groups > 1 and bits < 4:
            raise DuccioError(f"2-bit depthwise weights ('{layer.name}'): DORY packs them in channel pairs and "
                              "pulp-nn-mixed's kernel reads them in fours, so the board would compute wrong values",
                              where=f"layer '{layer.name}'", fix="give depthwise convs 4 or 8 bits")
        if isinstance(layer, Conv) and layer.groups > 1:
            need.setdefault(_find(parent, i), []).append((1, 8 // bits, why))
        elif isinstance(layer, Conv):
            kernel = int(np.prod(layer.weight.shape[2:]))
            need.setdefault(_find(parent, layer.input), []).append((kernel, 8 // bits, why))
        elif isinstance(layer, Linear):
            source = net.input_shape if layer.input == NETWORK_INPUT else shapes[layer.input]
            need.setdefault(_find(parent, layer.input), []).append((int(np.prod(source[1:])), 16, why))
    return need


def pad_for_kernels(net: IntNet) -> tuple[IntNet, dict[int, tuple[int, int]]]:
    """The network with zero channels where a kernel needs them, and {layer: (channels before, after)}.
    Refuses (DuccioError) a requirement on the network input's channels, which come from the data."""
    shapes = output_shapes(net)
    parent: dict[int, int] = {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Add):
            for source in layer.inputs:
                parent[_find(parent, source)] = _find(parent, i)
        elif _carries_class(layer):
            parent[_find(parent, layer.input)] = _find(parent, i)  # type: ignore[union-attr]
    target: dict[int, int] = {}  # class -> padded channel count
    for root, needs in _requirements(net, shapes, parent).items():
        members = [i for i in range(-1, len(net.layers)) if _find(parent, i) == root]
        channels = net.input_shape[0] if members[-1] == NETWORK_INPUT else shapes[members[-1]][0]
        padded = channels
        while any((padded * m) % q for m, q, _ in needs):
            padded += 1
        if padded == channels:
            continue
        if NETWORK_INPUT in members:
            subbyte = [why for m, q, why in needs if (channels * m) % q and "-bit" in why]
            if subbyte:  # the input's channels come from the data: nothing to pad
                raise DuccioError(f"{subbyte[0]} need the network input's {channels} channels x kernel to pack into "
                                  "whole bytes per output channel, and the input cannot be padded",
                                  where=subbyte[0].split(" of ")[-1],
                                  fix="keep that layer at 8 bits (the precision search does so by itself)")
            continue
        target[root] = padded
    if not target:
        return net, {}

    def size(index: int) -> int | None:
        return None if index == NETWORK_INPUT else target.get(_find(parent, index))

    layers = []
    changed: dict[int, tuple[int, int]] = {}
    for i, layer in enumerate(net.layers):
        out_c = size(i)
        if isinstance(layer, (Conv, Linear)):
            weight = layer.weight
            requant = layer.requant
            source_c = size(layer.input)
            if isinstance(layer, Conv) and layer.groups > 1:  # depthwise: in the class of its input
                extra = (out_c or weight.shape[0]) - weight.shape[0]
                weight = np.concatenate([weight, np.zeros((extra, *weight.shape[1:]), np.int64)])
                requant = _pad_requant(layer.requant, extra)
                assert layer.bias is None  # the lowering folds biases into l
                layers.append(Conv(layer.name, layer.input, weight, layer.stride, layer.pads, weight.shape[0],
                                   requant, layer.bias, layer.weight_bits))
            else:
                if source_c is not None:  # zero columns for the reader's new input channels
                    old_c = net.input_shape[0] if layer.input < 0 else shapes[layer.input][0]
                    if isinstance(layer, Conv):
                        weight = np.concatenate([weight, np.zeros((weight.shape[0], source_c - old_c,
                                                                   *weight.shape[2:]), np.int64)], axis=1)
                    else:
                        per_channel = weight.shape[1] // old_c
                        blocks = weight.reshape(weight.shape[0], old_c, per_channel)
                        pad = np.zeros((weight.shape[0], source_c - old_c, per_channel), np.int64)
                        weight = np.concatenate([blocks, pad], axis=1).reshape(weight.shape[0], -1)
                bias = layer.bias
                if out_c is not None:  # zero rows, k = l = 0: the new output channels are 0
                    extra = out_c - weight.shape[0]
                    weight = np.concatenate([weight, np.zeros((extra, *weight.shape[1:]), np.int64)])
                    assert requant is not None
                    requant = _pad_requant(requant, extra)
                    bias = None if bias is None else np.concatenate([bias, np.zeros(extra, np.int64)])
                if isinstance(layer, Conv):
                    layers.append(Conv(layer.name, layer.input, weight, layer.stride, layer.pads, layer.groups,
                                       requant, bias, layer.weight_bits))
                else:
                    layers.append(Linear(layer.name, layer.input, weight, requant, bias, layer.weight_bits))
        else:
            layers.append(layer)
        if out_c is not None:
            changed[i] = (shapes[i][0], out_c)
    return net.with_layers(layers), changed
