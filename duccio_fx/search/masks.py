"""Channel masks of the mask-based search (PIT-like) and the layers that apply them.

Each searchable channel group owns a vector α (initialised to 1). The forward pass uses the binarized mask
`|α| ≥ threshold` (the channel with the largest |α| always stays), the backward pass a straight-through
estimator. Masks are applied on the *input side of every layer that mixes channels* (conv with groups=1,
linear): multiplying a consumer's weights by the mask of its input channels is exactly removing those
input channels. Everything between a producer and its consumers acts per channel (BN, activations,
depthwise convs, adds, concats), so a removed channel never reaches anything that is not masked — which
is why the exported, physically smaller model computes the same function.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from duccio_fx.ir.meta import ChannelSpec

# A channel spec with bank slots in place of group ids: (index in the bank or -1 for "always on", start, stop,
# block), so the forward pass picks masks out of the bank's tuple without a lookup.
BankSpec = tuple[tuple[int, int, int, int], ...]


def binarize(alpha: torch.Tensor, threshold: float) -> torch.Tensor:
    """Hard 0/1 mask forward, gradient of |α| backward; the largest |α| always stays on."""
    magnitude = alpha.abs()
    hard = (magnitude >= threshold).to(alpha.dtype)
    keep = F.one_hot(magnitude.argmax(), alpha.numel()).to(alpha.dtype)
    hard = torch.maximum(hard, keep)
    return hard + (magnitude - magnitude.detach())


class MaskBank(nn.Module):
    """The architecture parameters: one α vector per searchable group. Calling it returns all masks."""

    def __init__(self, group_ids: Sequence[int], sizes: Sequence[int], threshold: float = 0.5,
                 init: float = 1.0) -> None:
        super().__init__()
        self.group_ids = list(group_ids)
        self.threshold = threshold
        self.alphas = nn.ParameterList(nn.Parameter(torch.full((n,), float(init))) for n in sizes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        return tuple(binarize(a, self.threshold) for a in self.alphas)


def assemble(masks: tuple[torch.Tensor, ...], spec: BankSpec) -> torch.Tensor:
    """The 0/1 vector over a tensor's channel dim described by `spec` (frozen slices are all ones)."""
    pieces = []
    for index, start, stop, block in spec:
        if index < 0:
            pieces.append(masks[0].new_ones((stop - start) * block) if masks else torch.ones((stop - start) * block))
        else:
            piece = masks[index][start:stop]
            pieces.append(piece if block == 1 else piece.repeat_interleave(block))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)



class MaskSelect(nn.Module):
    """Picks the mask of one consumer's input channels out of the bank's masks (a module, so the graph
    keeps it as one node through pickling, which re-traces the generated code)."""

    def __init__(self, spec: BankSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, masks: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return assemble(masks, self.spec)

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


class MaskedConv1d(nn.Conv1d):
    """A Conv1d whose input channels are multiplied by a 0/1 mask (through the weights: cheap)."""

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1)
        return self._conv_forward(x, w, self.bias)


class MaskedConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1, 1)
        return self._conv_forward(x, w, self.bias)


class MaskedConv3d(nn.Conv3d):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w = self.weight if in_mask is None else self.weight * in_mask.view(1, -1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


class MaskedLinear(nn.Linear):
    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        w = self.weight if in_mask is None else self.weight * in_mask
        return F.linear(x, w, self.bias)


MASKED: dict[type, type] = {nn.Conv1d: MaskedConv1d, nn.Conv2d: MaskedConv2d, nn.Conv3d: MaskedConv3d,
                            nn.Linear: MaskedLinear}
PLAIN: dict[type, type] = {v: k for k, v in MASKED.items()}


def as_masked(module: nn.Module) -> nn.Module:
    """The same module object re-classed to its masked twin (parameters and state-dict keys unchanged);
    a module called twice in `forward` is re-classed once."""
    if type(module) not in PLAIN:
        module.__class__ = MASKED[type(module)]
    return module
