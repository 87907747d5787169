"""The recipe's settings: epochs, optimizers, objective form and λ schedule, the method and its options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SearchSettings:
    warmup_epochs: int = 5
    search_epochs: int = 10  # minimum
    finetune_epochs: int = 5
    max_search_epochs: int | None = None  # default: 2 x search_epochs
    lr: float = 1e-3
    arch_lr: float | None = None  # None: auto, so θ can move far enough within the minimum search
    weight_decay: float = 1e-4
    form: str = "max"
    schedule: str = "ramp"
    constant_lambda: float = 1.0
    ramp_fraction: float = 0.5  # λ reaches its target at this fraction of the minimum search epochs
    patience: int = 2
    seed: int = 0
    layerwise: float | None = None  # slack C: one layer-memory constraint per critical layer
    method: str = "mask"  # a registered search method (duccio_fx.search_methods())
    method_options: dict[str, Any] = field(default_factory=dict)  # passed to the method's factory
    # training batches run (without gradients) to re-estimate BatchNorm statistics of the current architecture
    # before each search-phase validation; 0 turns it off
    bn_recalibration_batches: int = 8

    @property
    def search_limit(self) -> int:
        return self.max_search_epochs if self.max_search_epochs is not None else 2 * self.search_epochs
