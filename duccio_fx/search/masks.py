"""Channel masks of the mask-based search (PIT-like) and the layers that apply them.

Each searchable channel group owns a vector α (initialised to 1). The forward pass uses the binarized mask
`|α| ≥ threshold` (the channel with the largest |α| always stays), the backward pass a straight-through
estimator. With `channel_multiple` N > 1 (hardware-friendly widths) each α rules a block of N channels, so a
group keeps a multiple of N channels (the last block of a group whose width N does not divide is smaller).
Masks are applied on the *input side of every layer that mixes channels* (conv with groups=1, linear):
multiplying a consumer's weights by the mask of its input channels is exactly removing those input channels.
Everything between a producer and its consumers acts per channel (BN, activations, depthwise convs, adds,
concats), so a removed channel never reaches anything that is not masked — which is why the exported,
physically smaller model computes the same function.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from duccio_fx.ir.meta import ChannelSpec
from duccio_fx.search.precision import mixed_weight

# A channel spec with bank slots in place of group ids: (index in the bank or -1 for "always on", start, stop,
# block).
BankSpec = tuple[tuple[int, int, int, int], ...]


def hard_masks(alpha: torch.Tensor, segment: torch.Tensor, groups: int, threshold: float) -> torch.Tensor:
    """The 0/1 masks of all groups at once (α of group `segment[i]` at i): |α| ≥ threshold, and the first
    largest |α| of each group always stays (as `argmax` picks it). A fixed number of vector ops whatever the
    number of groups, no host sync, no gradient."""
    magnitude = alpha.detach().abs()
    hard = magnitude >= threshold
    largest = magnitude.new_zeros(groups).scatter_reduce(0, segment, magnitude, "amax", include_self=False)
    position = torch.arange(alpha.numel(), device=alpha.device)
    candidates = torch.where(magnitude == largest[segment], position, alpha.numel())
    first = position.new_full((groups,), alpha.numel()).scatter_reduce(0, segment, candidates, "amin")
    return (hard | (position == first[segment])).to(alpha.dtype)


def starts(sizes: Sequence[int]) -> list[int]:
    """Where each of consecutive runs of these sizes starts: [3, 2, 4] -> [0, 3, 5]."""
    return [0, *itertools.accumulate(sizes)][:len(sizes)]


def channel_blocks(channels: int, multiple: int) -> list[int]:
    """How `--channel-multiple N` cuts a group of `channels` channels: blocks of N channels, the last one
    smaller when N does not divide the width (e.g. 10 channels, N = 4: [4, 4, 2])."""
    full, rest = divmod(int(channels), int(multiple))
    return [int(multiple)] * full + ([rest] if rest else [])


class MaskBank(nn.Module):
    """The architecture parameters: one α entry per block of `block` channels of every searchable group (one
    per channel with the default block = 1), in one flat vector (group after group), so binarizing, the costs
    and the optimizer each touch one tensor. `sizes` stays the channels per group: the masks (`hard`, `masks`,
    calling it) are always one entry per channel, each block's mask repeated over its channels, so everything
    downstream (MaskSelect, the costs, the export) sees per-channel masks whatever the block. Calling it
    returns all masks as one flat vector with a trailing constant 1 (the "always on" entry of `MaskSelect`)."""

    def __init__(self, group_ids: Sequence[int], sizes: Sequence[int], threshold: float = 0.5,
                 init: float = 1.0, block: int = 1) -> None:
        super().__init__()
        self.group_ids = list(group_ids)
        self.sizes = [int(n) for n in sizes]
        self.block = int(block)
        self.threshold = threshold
        # block_sizes[i]: the channels of each block of group i (all 1 with block = 1)
        self.block_sizes = [channel_blocks(n, self.block) for n in self.sizes]
        blocks = [len(b) for b in self.block_sizes]
        self.alpha = nn.Parameter(torch.full((sum(blocks),), float(init)))
        segment = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(blocks, dtype=torch.long))
        self.register_buffer("segment", segment, persistent=False)
        # channel -> block: the entry of α that rules each entry of the per-channel mask vector
        expand = None
        if self.block > 1:
            expand = torch.repeat_interleave(torch.arange(sum(blocks)),
                                             torch.tensor([n for b in self.block_sizes for n in b], dtype=torch.long))
        self.register_buffer("channel_block", expand, persistent=False)

    def _expand(self, block_masks: torch.Tensor) -> torch.Tensor:
        """Per-block masks -> per-channel masks (one index_select; the identity with block = 1)."""
        return block_masks if self.channel_block is None else block_masks.index_select(0, self.channel_block)

    def hard_blocks(self) -> torch.Tensor:
        """The 0/1 mask of every block (no gradient), computed once while α is unchanged: the forward pass
        and the costs of a training step share them (an optimizer step or `set_masks` changes α's version)."""
        alpha = self.alpha
        key = (alpha._version, alpha.data_ptr(), alpha.device, self.threshold)
        if getattr(self, "_hard_key", None) != key:
            self._hard_blocks = hard_masks(alpha, self.segment, len(self.sizes), self.threshold)
            self._hard = self._expand(self._hard_blocks)
            self._hard_key = key
        return self._hard_blocks

    def hard(self) -> torch.Tensor:
        """The 0/1 masks of every channel (no gradient), cached as `hard_blocks`."""
        self.hard_blocks()
        return self._hard

    def masks(self) -> torch.Tensor:
        """All masks, one entry per channel: the 0/1 masks forward, the gradient of |α| backward
        (straight-through; a block's α gets the sum of its channels' gradients)."""
        magnitude = self.alpha.abs()
        return self._expand(self.hard_blocks() + (magnitude - magnitude.detach()))

    def forward(self) -> torch.Tensor:
        masks = self.masks()
        return torch.cat([masks, masks.new_ones(1)])

    def extra_repr(self) -> str:
        # only with blocks: the repr (and so the warmup-cache key and checkpoint signature) of block = 1
        # banks stays what it was before blocks existed
        return f"channel_multiple={self.block}" if self.block > 1 else ""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_hard", "_hard_blocks", "_hard_key"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a bank pickled before blocks existed is a block = 1 bank
        state.setdefault("block", 1)
        state.setdefault("block_sizes", [[1] * n for n in state["sizes"]])
        if "channel_block" not in state.get("_buffers", {}):
            state.setdefault("_buffers", {})["channel_block"] = None
        super().__setstate__(state)

    def offsets(self) -> list[int]:
        """Where each group starts in the flat per-channel mask vector."""
        return starts(self.sizes)

    def alpha_offsets(self) -> list[int]:
        """Where each group starts in α (= `offsets()` with block = 1)."""
        return starts([len(b) for b in self.block_sizes])

    def block_starts(self, index: int) -> list[int]:
        """The first channel of each block of the `index`-th group."""
        return starts(self.block_sizes[index])

    def group_alpha(self, index: int) -> torch.Tensor:
        """The α of the `index`-th group, one entry per block (a view of the flat vector)."""
        start = self.alpha_offsets()[index]
        return self.alpha[start:start + len(self.block_sizes[index])]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # state dicts written before the α were one flat vector hold one `alphas.<i>` per group
        old = [prefix + f"alphas.{i}" for i in range(len(self.sizes))]
        if prefix + "alpha" not in state_dict and old and all(k in state_dict for k in old):
            state_dict[prefix + "alpha"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def channel_index(spec: BankSpec, offsets: Sequence[int], always_on: int) -> list[int]:
    """Entries of the bank's flat mask vector that make up a tensor's channel mask described by `spec`
    (`always_on`: the index of the trailing constant 1)."""
    index: list[int] = []
    for slot, start, stop, block in spec:
        for c in range(start, stop):
            index.extend([always_on if slot < 0 else offsets[slot] + c] * block)
    return index


class MaskSelect(nn.Module):
    """Picks the mask of one consumer's input channels out of the bank's flat masks: a slice when its
    channels are one contiguous run of the bank, else one gather (a module, so the graph keeps it as one node
    through pickling, which re-traces the generated code)."""

    def __init__(self, spec: BankSpec, offsets: Sequence[int], always_on: int) -> None:
        super().__init__()
        self.spec = spec
        index = channel_index(spec, offsets, always_on)
        contiguous = bool(index) and index == list(range(index[0], index[0] + len(index)))
        self.span = (index[0], index[0] + len(index)) if contiguous else None
        self.register_buffer("index", None if contiguous else torch.tensor(index, dtype=torch.long),
                             persistent=False)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        if self.span is not None:
            return masks[self.span[0]:self.span[1]]
        return masks.index_select(0, self.index)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


def bank_spec(spec: ChannelSpec, bank_index: Mapping[int, int]) -> BankSpec:
    """A channel spec with searchable groups by their index in the bank, the rest as -1."""
    return tuple((bank_index.get(group, -1), start, stop, block) for group, start, stop, block in spec)


def kept_entries(spec: ChannelSpec, masks: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Indices along the channel dim that survive, given boolean masks by group id (absent: all kept)."""
    kept, offset = [], 0
    for group, start, stop, block in spec:
        width = (stop - start) * block
        if group not in masks:
            kept.append(torch.arange(offset, offset + width))
        else:
            on = torch.nonzero(masks[group][start:stop]).flatten()
            kept.append((offset + on[:, None] * block + torch.arange(block)[None, :]).flatten())
        offset += width
    return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)


WIDTHS = "duccio_bit_widths"  # on a quantised twin: the widths its `precision` g selects among


def _quantized(module: nn.Module, w: torch.Tensor, precision: torch.Tensor | None) -> torch.Tensor:
    return w if precision is None else mixed_weight(w, precision, getattr(module, WIDTHS))


class MaskedConv1d(nn.Conv1d):
    """A Conv1d whose input channels are multiplied by a 0/1 mask (through the weights: cheap), and whose
    weights are fake-quantized at the width `precision` (a one-hot g over its widths) selects."""

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None,  # type: ignore[override]
                precision: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1)
        return self._conv_forward(x, _quantized(self, w, precision), self.bias)


class MaskedConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None,  # type: ignore[override]
                precision: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1, 1)
        return self._conv_forward(x, _quantized(self, w, precision), self.bias)


class MaskedConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None,  # type: ignore[override]
                precision: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1, 1, 1)
        return self._conv_forward(x, _quantized(self, w, precision), self.bias)


class MaskedLinear(nn.Linear):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None,  # type: ignore[override]
                precision: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if in_mask is None else self.weight * in_mask
        return F.linear(x, _quantized(self, w, precision), self.bias)


MASKED: dict[type, type] = {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d,
                            nn.Linear: MaskedLinear}
PLAIN: dict[type, type] = {v: k for k, v in MASKED.items()}


def as_masked(module: nn.Module) -> nn.Module:
    """The same module object re-classed to its masked twin (parameters and state-dict keys unchanged);
    a module called twice in `forward` is re-classed once."""
    if type(module) not in PLAIN:
        module.__class__ = MASKED[type(module)]
    return module
