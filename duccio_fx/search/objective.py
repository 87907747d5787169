"""The DUCCIO objective: task loss + Σ_j λ_j · penalty(R_j, T_j), with the λ ramp of the paper.

Forms (`form=`):
  "max"        λ · max(0, R − T)   DUCCIO: no pressure once a constraint is met (default)
  "abs"        λ · |R − T|         pulls the cost *to* the target from both sides
  "objective"  λ · R               classical DNAS cost regularizer (no target; for comparisons)

λ schedule (`schedule="ramp"`): after warmup, `calibrate(L̂, costs)` sets
λ_j,target = L̂ / |R̂_j − T_j| ("objective": L̂ / R̂_j), and `lambdas(e)` = λ_target · min(1, max(e / E_ramp,
start)) for search epoch e (fractional), start = 1 % as in the authors' code; once the ramp is complete, the λ_target of a constraint still violated
at the end of an epoch doubles (`escalate`, a guard beyond the paper). Guards: the denominator is
at least 1 % of the bound, so a constraint already met after warmup (or R̂ = T) still gets a finite, non-zero λ
and bites if the cost later rises above the bound. `schedule="constant"` uses `constant_lambda` for every
constraint from the first step (for ablations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from duccio_fx.costs.model import Costs
from duccio_fx.search.constraints import ResolvedConstraint

FORMS = ("max", "abs", "objective")
SCHEDULES = ("ramp", "constant")


@dataclass
class DuccioObjective:
    constraints: Sequence[ResolvedConstraint]  # R_j <= T_j, bounds resolved against the seed
    form: str = "max"
    schedule: str = "ramp"
    ramp_epochs: float = 1.0
    start: float = 0.01
    constant_lambda: float = 1.0
    min_denominator: float = 0.01  # of the bound
    escalation: float = 2.0  # after the ramp, λ of a still-violated constraint grows by this per epoch
    lambda_targets: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        plain = [c for c in self.constraints if not isinstance(c, ResolvedConstraint)]
        if plain:
            raise TypeError(f"DuccioObjective needs constraints with absolute bounds, got {plain[0]!r}: resolve "
                            "each against the seed first (c.resolve(seed_costs)) or give the bound (c.at(100.0))")

    def calibrate(self, task_loss: float, costs: Costs | dict[str, Any]) -> list[float]:
        """λ_target per constraint from the task loss and the costs at the end of warmup."""
        targets = []
        for c in self.constraints:
            r = float(c.value(costs))
            floor = max(self.min_denominator * abs(c.bound), 1e-12)
            gap = abs(r) if self.form == "objective" else abs(r - c.bound)
            targets.append(abs(task_loss) / max(gap, floor))
        self.lambda_targets = targets
        return list(targets)

    def lambdas(self, epoch: float) -> list[float]:
        """λ_j at (fractional) search epoch `epoch`."""
        if self.schedule == "constant":
            return [self.constant_lambda] * len(self.constraints)
        if not self.lambda_targets:
            raise RuntimeError("call calibrate() after warmup before using a ramped λ")
        scale = min(1.0, max(epoch / self.ramp_epochs if self.ramp_epochs > 0 else 1.0, self.start))
        return [lt * scale for lt in self.lambda_targets]

    def escalate(self, costs: dict[str, Any], epoch: float) -> list[float]:
        """After the ramp, multiply λ_target of every still-violated constraint by `escalation`.

        The paper's fixed λ_target balances the penalty against the task loss as it was after warmup; as
        the task loss falls, or when a few important channels resist, that balance can settle above the bound.
        Raising λ only while a constraint is violated keeps "search until every constraint is met" finite
        without adding pressure to constraints that are met.
        """
        if self.schedule != "ramp" or epoch < self.ramp_epochs or self.escalation <= 1:
            return list(self.lambda_targets)
        for j, v in enumerate(self.violations(costs)):
            if v > 0:
                self.lambda_targets[j] *= self.escalation
        return list(self.lambda_targets)

    def penalties(self, costs: dict[str, Any]) -> list[torch.Tensor]:
        """penalty(R_j, T_j) per constraint, before λ (differentiable)."""
        out = []
        for c in self.constraints:
            r = torch.as_tensor(c.value(costs), dtype=torch.float64)
            if self.form == "max":
                out.append(torch.relu(r - c.bound))
            elif self.form == "abs":
                out.append((r - c.bound).abs())
            else:
                out.append(r)
        return out

    def penalty(self, costs: dict[str, Any], epoch: float) -> torch.Tensor:
        """Σ_j λ_j(epoch) · penalty_j: add it to the task loss."""
        total: torch.Tensor | None = None  # built from the costs' tensors: on their device, no copy
        for lam, p in zip(self.lambdas(epoch), self.penalties(costs)):
            total = lam * p if total is None else total + lam * p
        return total if total is not None else torch.zeros((), dtype=torch.float64)

    def violations(self, costs: dict[str, Any]) -> list[float]:
        """R_j − T_j (> 0 means violated), as floats."""
        return [c.violation(costs) for c in self.constraints]

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_targets": list(self.lambda_targets)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lambda_targets = list(state["lambda_targets"])
