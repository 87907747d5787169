"""Real architectures (torchvision, timm; random weights, nothing downloaded) against the independent op-level
counter of `tests/counting.py`: the costs of the analysis equal what the model really runs, functional layers
(`F.linear`, `F.conv2d`, matmuls with a parameter) included, and the mask export stays exact.
`benchmarks/real_models.py` runs the same checks over every torchvision classifier and 40 timm models.

The first tests check the counter itself on hand-counted models, so that the two sides cannot be wrong together.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import counting


# --------------------------------------------------------------------------------------------------
# the counter on hand-counted models
# --------------------------------------------------------------------------------------------------
class _Functional(nn.Module):
    """Layers called every way: F.conv2d with a module's weight, a transposed conv, a weight standardised in
    forward (timm's StdConv), F.linear on a channels-last (non-contiguous) input, `x @ w`, torch.matmul, a module
    called twice, an attention product of two activations (not a layer) and a fixed blur filter (a buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.std = nn.Parameter(torch.randn(4, 4, 1, 1))
        self.w = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(6))
        self.proj = nn.Parameter(torch.randn(6, 5))
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3, bias=False)
        self.register_buffer("blur", torch.ones(5, 1, 3, 3) / 9)

    def forward(self, x):
        y = F.conv2d(x, self.conv.weight, self.conv.bias, padding=1)             # [1, 8, 6, 6]
        y = self.up(y)                                                            # [1, 4, 12, 12]
        w = (self.std - self.std.mean((1, 2, 3), keepdim=True)) / 2
        y = F.conv2d(y, w)                                                        # [1, 4, 12, 12]
        y = F.linear(y.permute(0, 2, 3, 1), self.w, self.b)                       # [1, 12, 12, 6]
        y = torch.matmul(y, self.proj)                                            # [1, 12, 12, 5]
        y = self.fc(self.fc(y))                                                   # twice
        t = y.flatten(1, 2)                                                       # [1, 144, 5]
        t = (t @ t.transpose(1, 2)).softmax(-1) @ t                               # activations only
        z = F.conv2d(t.transpose(1, 2).reshape(1, 5, 12, 12), self.blur, padding=1, groups=5)
        return self.head(z.mean((2, 3)))


def test_the_counter_sees_every_layer_however_it_is_called():
    count = counting.count(_Functional(), torch.randn(1, 3, 6, 6))
    assert count.per_layer == {
        "conv": (8 * 3 * 9 + 8, 8 * 3 * 9 * 36),
        "up": (8 * 4 * 4 + 4, 8 * 4 * 4 * 36),   # transposed: weight elements × input positions
        "std": (16, 16 * 144),
        "w": (24 + 6, 24 * 144),                  # its bias comes from F.linear, not from an addmm
        "proj": (30, 30 * 144),
        "fc": (30, 2 * 25 * 144),                 # MACs per call, weights once
        "head": (15, 15),
    }
    assert count.params == sum(p for p, _ in count.per_layer.values())
    assert count.macs == sum(m for _, m in count.per_layer.values())
    assert len(count.other) == 1 and "buffer" in count.other[0]
    assert not count.unhandled


def test_the_counter_runs_at_batch_one_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count = counting.count(model, torch.randn(5, 3, 6, 6))
    assert (count.params, count.macs) == (4 * 27 + 4 + 64 * 2 + 2, 4 * 27 * 16 + 64 * 2)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_counter_sees_the_projections_of_multihead_attention():
    """nn.MultiheadAttention's inference fast path fuses its projections into one op: the counter turns it off."""
    e, t = 8, 5
    mha = nn.MultiheadAttention(e, 2, batch_first=True).eval()
    count = counting.count(_SelfAttention(mha), torch.randn(1, t, e))
    assert count.params == 3 * e * e + 3 * e + e * e + e
    assert count.macs == t * 3 * e * e + t * e * e
    assert torch.backends.mha.get_fastpath_enabled()


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_tied_weights_count_once():
    emb = nn.Linear(4, 4, bias=False)
    model = nn.Sequential(emb, nn.ReLU(), nn.Linear(4, 4, bias=False))
    model[2].weight = emb.weight
    count = counting.count(model, torch.randn(1, 4))
    assert (count.params, count.macs) == (16, 32)
    assert math.prod(emb.weight.shape) == 16
