"""Choice points of the path method: alternatives, logits θ, Gumbel-softmax sampling of all points at once.

Training: g = Gumbel-softmax(θ, τ) with a hard one-hot forward and the soft gradient (straight-through).
  estimator "all"      y = Σ_i g_i · alt_i(x): every alternative runs, θ gets ∂L/∂g_i from each (the paper's);
                       only the sampled one runs backward (the others get zero gradient since g_i = 0)
  estimator "sampled"  y = g_k · alt_k(x), k the sampled one: one alternative runs, θ still trains through g_k
With `argmax_share` > 0 (the search only) that share of the draws is instead every point's argmax alternative,
a constant one-hot: a step that trains the weights of the architecture the search holds (θ gets no gradient
from it, and the "all" estimator runs that alternative alone).
Evaluation (and export): the argmax alternative alone. Alternatives start equally likely (θ = 0); ties go
to the first alternative, the seed's, so an untrained point computes the seed.

The θ of every point of a supernet live in one `ChoiceBank` (one flat vector, point after point), which
draws every point's g in one go: a fixed number of ops whatever the number of points, and one read of the
device per draw (which alternative each point runs), not one per point. The last g is kept so the
space's costs use the same sample as the forward pass (paper eq. 8).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

ESTIMATORS = ("all", "sampled")


def first_max(values: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Index of the first largest entry of each segment (as `argmax` picks it), for all segments at once."""
    largest = values.new_full((segments,), -torch.inf).scatter_reduce(0, segment, values, "amax")
    position = torch.arange(values.numel(), device=values.device)
    candidates = torch.where(values == largest[segment], position, values.numel())
    return position.new_full((segments,), values.numel()).scatter_reduce(0, segment, candidates, "amin")


def _host_uniform() -> float:
    """A uniform draw from torch's host generator (seeded with the run): a host tensor, so no device read."""
    draw = torch.rand((), device="cpu")
    draw.duccio_host_copy = True  # type: ignore[attr-defined]  # (tests/test_step_sync.py counts device reads)
    return float(draw)


class ChoiceBank(nn.Module):
    """The architecture parameters of a supernet: the θ of every choice point in one flat vector."""

    # while θ trains (the search): the share of draws that run every point's argmax alternative, steps that
    # train the weights of the architecture the search holds now (θ learns from the other draws)
    argmax_share: float = 0.0

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self.sizes = [int(n) for n in sizes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.theta = nn.Parameter(torch.zeros(sum(self.sizes)))
        segment = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes, dtype=torch.long))
        self.register_buffer("segment", segment, persistent=False)
        self.register_buffer("start", torch.tensor(self.offsets, dtype=torch.long), persistent=False)
        self.temperature = 1.0
        self.sample: torch.Tensor | None = None  # the g of the last draw, every point's
        self.picks: list[int] = []  # the alternative each point runs with that g
        # while θ is frozen (the warmup): the share of draws that run the seed's whole path (every point's
        # first alternative); the others draw every point uniformly. None: every draw is uniform
        self.seed_share: float | None = None
        self._unused: set[int] = set()  # points that have not run with that g yet

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sample"] = None  # a tensor in the autograd graph cannot be copied or pickled
        state["_unused"] = set()
        return state

    def _one_hot(self, index: torch.Tensor) -> torch.Tensor:
        hard = torch.zeros_like(self.theta)
        return hard.index_fill(0, index, 1.0)

    def draw(self) -> torch.Tensor:
        """New hard one-hot g for every point (straight-through soft gradient), kept as `sample`."""
        n = len(self.sizes)
        if self.seed_share is not None and not self.theta.requires_grad and _host_uniform() < self.seed_share:
            return self._keep(self._one_hot(self.start), [0] * n)  # the seed's path (no device read)
        if self.argmax_share > 0 and self.theta.requires_grad and _host_uniform() < self.argmax_share:
            first = first_max(self.theta.detach(), self.segment, n)
            # constant: no gradient reaches θ through this draw
            return self._keep(self._one_hot(first), (first - self.start).tolist())
        theta = self.theta
        gumbels = -torch.empty_like(theta).exponential_().log()
        y = (theta + gumbels) / self.temperature
        shifted = (y - y.detach().new_full((n,), -torch.inf).scatter_reduce(0, self.segment, y.detach(), "amax")
                   [self.segment]).exp()
        soft = shifted / shifted.new_zeros(n).index_add(0, self.segment, shifted)[self.segment]
        first = first_max(y.detach(), self.segment, n)
        # (the tolist is the one read of the device per draw)
        return self._keep(self._one_hot(first) - soft.detach() + soft, (first - self.start).tolist())

    def _keep(self, sample: torch.Tensor, picks: list[int]) -> torch.Tensor:
        """Make `sample` the current g (every point's alternative in `picks`), unused by any point yet."""
        self.sample, self.picks = sample, picks
        self._unused = set(range(len(self.sizes)))
        return sample

    def take(self, point: int) -> tuple[int, torch.Tensor]:
        """The alternative `point` runs in this forward pass and the flat g: a point that already ran with the
        current g starts a new forward pass, so it draws anew."""
        if point not in self._unused:
            self.draw()
        self._unused.discard(point)
        return self.picks[point], self.sample  # type: ignore[return-value]

    def argmax(self) -> torch.Tensor:
        """The one-hot of every point's argmax θ (ties: the first alternative), as one flat vector."""
        return self._one_hot(first_max(self.theta.detach(), self.segment, len(self.sizes)))

    def probabilities(self) -> torch.Tensor:
        """softmax(θ) of every point, as one flat vector (differentiable)."""
        n = len(self.sizes)
        theta = self.theta
        e = (theta - theta.detach().new_full((n,), -torch.inf).scatter_reduce(0, self.segment, theta.detach(), "amax")
             [self.segment]).exp()
        return e / e.new_zeros(n).index_add(0, self.segment, e)[self.segment]


class ChoicePoint(nn.Module):
    """One choice among alternatives; its θ is a slice of a `ChoiceBank` (its own, until a supernet binds it
    to the bank of all its points)."""

    def __init__(self, alternatives: dict[str, nn.Module], estimator: str = "all") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for name, module in alternatives.items():
            self.add_module(name, module)
        self.names = list(alternatives)
        self.estimator = estimator
        self.bind(ChoiceBank([len(self.names)]), 0)

    def bind(self, bank: ChoiceBank, index: int) -> None:
        """Take θ from `bank` (not a child module: the supernet owns the bank, every point reads it)."""
        self.__dict__["bank"] = bank
        self.index = index

    @property
    def theta(self) -> torch.Tensor:
        """This point's logits: a view of the bank's flat θ."""
        start = self.bank.offsets[self.index]
        return self.bank.theta[start:start + len(self.names)]

    @property
    def theta_grad(self) -> torch.Tensor | None:
        """This point's part of the gradient of the bank's θ (None before a backward pass reaches it)."""
        grad = self.bank.theta.grad
        start = self.bank.offsets[self.index]
        return None if grad is None else grad[start:start + len(self.names)]

    @property
    def sample(self) -> torch.Tensor | None:
        """This point's g of the last draw (None before the first one)."""
        if self.bank.sample is None:
            return None
        start = self.bank.offsets[self.index]
        return self.bank.sample[start:start + len(self.names)]

    @property
    def temperature(self) -> float:
        return self.bank.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self.bank.temperature = value

    def chosen(self) -> int:
        """Index of the alternative evaluation and export use."""
        return int(self.theta.detach().argmax())

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.theta.detach(), 0)

    def draw(self) -> torch.Tensor:
        """New g for every point of the bank; this point's part of it."""
        self.bank.draw()
        return self.sample  # type: ignore[return-value]

    def forward(self, x: Any, in_mask: torch.Tensor | None = None) -> Any:
        alts = [self._runner(name, in_mask) for name in self.names]
        if not self.training:
            return alts[self.chosen()](x)
        k, g = self.bank.take(self.index)
        start = self.bank.offsets[self.index]
        out = alts[k](x) * g[start + k]
        if self.estimator == "sampled" or not g.requires_grad:
            return out  # (θ frozen, or an argmax draw: the others would contribute nothing)
        # "all": the others run forward for θ's gradient ⟨∂L/∂y, alt_i(x)⟩, but not backward: with g_i = 0
        # their weights and input get exactly zero gradient anyway, so graph-free outputs change nothing
        with torch.no_grad():
            others = [(i, alt(x)) for i, alt in enumerate(alts) if i != k]
        for i, y in others:
            out = out + y * g[start + i]
        return out

    def _runner(self, name: str, in_mask: torch.Tensor | None) -> Any:
        """Alternative `name` as a callable of the block's input. With channel masks (`--method path+mask`) the
        parts of it that mix the block's input channels (`mask_readers`, masked twins) get their mask."""
        alt = getattr(self, name)
        readers = getattr(self, "mask_readers", {}).get(name, ())
        if in_mask is None or not readers:
            return alt

        def run(x: Any) -> Any:
            for part, module in alt.named_children():
                x = module(x, in_mask) if part in readers else module(x)
            return x
        return run

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}, alternatives={self.names}"
