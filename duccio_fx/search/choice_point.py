"""A choice point of the path method: alternatives, one logit vector θ, Gumbel-softmax sampling.

Training: g = Gumbel-softmax(θ, τ) with a hard one-hot forward and the soft gradient (straight-through).
  estimator "all"      y = Σ_i g_i · alt_i(x): every alternative runs, θ gets ∂L/∂g_i from each (the paper's);
                       only the sampled one runs backward (the others get zero gradient since g_i = 0)
  estimator "sampled"  y = g_k · alt_k(x), k the sampled one: one alternative runs, θ still trains through g_k
Evaluation (and export): the argmax alternative alone. Alternatives start equally likely (θ = 0); ties go
to the first alternative, the seed's, so an untrained point computes the seed.

The last g is kept so the space's costs use the same sample as the forward pass (paper eq. 8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ESTIMATORS = ("all", "sampled")


class ChoicePoint(nn.Module):
    def __init__(self, alternatives: dict[str, nn.Module], estimator: str = "all") -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        for name, module in alternatives.items():
            self.add_module(name, module)
        self.names = list(alternatives)
        self.theta = nn.Parameter(torch.zeros(len(self.names)))
        self.estimator = estimator
        self.temperature = 1.0
        self.sample: torch.Tensor | None = None  # the g of the last forward pass (not saved)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["sample"] = None  # a tensor in the autograd graph cannot be copied or pickled
        return state

    def chosen(self) -> int:
        """Index of the alternative evaluation and export use."""
        return int(self.theta.detach().argmax())

    def one_hot(self) -> torch.Tensor:
        return F.one_hot(self.theta.detach().argmax(), len(self.names)).to(self.theta.dtype)

    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.theta.detach(), 0)

    def draw(self) -> torch.Tensor:
        """A new hard one-hot g (straight-through soft gradient), kept as `sample` for the costs."""
        self.sample = F.gumbel_softmax(self.theta, tau=self.temperature, hard=True)
        return self.sample

    def forward(self, x: Any) -> Any:
        alts = list(self.children())
        if not self.training:
            self.sample = self.one_hot()
            return alts[self.chosen()](x)
        g = self.draw()
        k = int(g.detach().argmax())
        out = alts[k](x) * g[k]
        if self.estimator == "sampled":
            return out
        # "all": the others run forward for θ's gradient ⟨∂L/∂y, alt_i(x)⟩, but not backward: with g_i = 0
        # their weights and input get exactly zero gradient anyway, so graph-free outputs change nothing
        with torch.no_grad():
            others = [(i, alt(x)) for i, alt in enumerate(alts) if i != k]
        for i, y in others:
            out = out + y * g[i]
        return out

    def extra_repr(self) -> str:
        return f"estimator={self.estimator}, alternatives={self.names}"
